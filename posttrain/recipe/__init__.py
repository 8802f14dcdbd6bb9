"""The recipe: strict YAML loading (yamlfile); schema, sweeps and loading move here from config.py."""
