"""Operations: command-line queue tools (HTTP and metrics come later)."""
