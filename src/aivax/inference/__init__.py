"""The request pipeline: resolve, admit, hold, execute, settle (ARCHITECTURE.md §1)."""
