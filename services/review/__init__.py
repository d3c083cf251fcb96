"""The human-review queue: review cases that safety opens, and the terms reviewers' decisions add to the keyword
lists. Shared by safety (opens cases, reads the terms), the gateway (serves ReviewService) and dialogue."""
