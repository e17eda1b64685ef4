"""The machinery of a run, beside the lesson: data, the run folder, torchrun, the comparison and its scores, pictures, the command line."""
