"""The config toolkit every YAML file lrft reads is built with (recipes, sweep specs): strict YAML
(`yaml_files`), `key=value` overrides and dotted keys (`overrides`), strict sections and plain names
(`sections`, `names`), how a schema's sections nest (`schema`), pydantic's errors as one line per
problem (`problems`), and what is written from a schema's field descriptions:
commented YAML (`commented`) and a Markdown key reference (`reference`).

The schema a file is validated against, and what its messages say differently, are passed in.
"""
