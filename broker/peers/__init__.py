"""Everything about talking to other districts: channels, the client, cached recognition."""
