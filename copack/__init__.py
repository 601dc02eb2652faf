"""copack: the command-line entry point that ties the components together."""
