"""The recipe: its schema (`schema`, built on `fields` and the methods under
`posttrain/stages/`), the checks a field type cannot make (`references`), sweeps
(`sweep`), strict YAML (`yamlfile`) and loading with overrides (`load`)."""
