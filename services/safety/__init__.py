"""The safety process: keyword lists and the moderation endpoint, for input and streamed output."""
