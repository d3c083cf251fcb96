"""dialogue: owns conversations and runs turns against the model."""
