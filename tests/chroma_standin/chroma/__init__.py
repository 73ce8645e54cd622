"""Test stand-in for Chroma (see ../README.md). Not Chroma."""

STANDIN = True
