"""Read and write GPT-2 weights in every supported format."""
