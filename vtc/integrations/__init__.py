"""Optional integrations with other tools; each is imported only by the tool that uses it, never by ``import vtc``."""
