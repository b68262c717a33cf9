"""Engine plugins: readers and writers for training engines' own checkpoint formats."""
