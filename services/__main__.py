from chatmesh.cli import main

main()
