"""A config as YAML with each field's description as a comment: a file that documents itself (what
`lrft init` writes). Any pydantic model will do: the comments are its fields' descriptions."""

from __future__ import annotations

from pydantic import BaseModel

from lrft.config.yaml_files import flow_yaml


def commented_yaml(config: BaseModel, header: list[str]) -> str:
    """`config` as YAML, `header` as the opening comment lines, each field's description after it; a blank
    line after each top-level section."""
    lines = [f"# {h}" if h else "#" for h in header] + [""]
    emit_section(config, "", lines)
    return "\n".join(lines).rstrip() + "\n"


def emit_section(section: BaseModel, indent: str, lines: list[str]) -> None:
    """Append `section`'s fields as YAML lines at `indent`, its sections nested below their key."""
    values = section.model_dump(mode="json")
    for key, field in type(section).model_fields.items():
        value = getattr(section, key)
        comment = f"  # {field.description}" if field.description else ""
        if isinstance(value, BaseModel):
            lines.append(f"{indent}{key}:{comment}")
            emit_section(value, indent + "  ", lines)
            if indent == "":
                lines.append("")
        else:
            lines.append(f"{indent}{key}: {flow_yaml(values[key])}{comment}")
