"""Sub-commands of the ``vitfree`` CLI, one module each."""
