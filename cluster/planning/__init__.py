"""Planning before anything starts: the batch plan a config implies, and the GPU memory budget."""
