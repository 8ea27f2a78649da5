"""Examples of bringing your own network to cvlab (classes that are deliberately not in the zoo)."""
