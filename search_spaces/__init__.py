"""Built-in search spaces (YAML data, shipped as package data of ``autoq.search_spaces``)."""
