"""Recipes: overrides, strict validation with every problem in one message, shipped recipes valid."""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Annotated, Literal

import pytest
import yaml
from pydantic import Field

from lrft import methods
from lrft.config.commented import commented_yaml
from lrft.config.overrides import apply_overrides, dotted_get, dotted_pop
from lrft.config.problems import validated
from lrft.config.reference import markdown_text
from lrft.config.sections import Section
from lrft.config.yaml_files import parse_yaml
from lrft.errors import ConfigError, LrftError
from lrft.recipe import load_recipe, validate
from tests.helpers import docs_generator

ROOT = Path(__file__).parents[1]
RECIPES = sorted((ROOT / "recipes").glob("*.yaml"))
MINIMAL = {"model": {"name": "minilm"}, "data": {"task": "glue/mrpc"}, "adapter": {"method": "tlora"}}


def write(tmp_path, text: str, name="r.yaml") -> Path:
    p = tmp_path / name
    p.write_text(text)
    return p


def test_minimal_recipe_gets_defaults_and_name_from_stem(tmp_path):
    r = load_recipe(write(tmp_path, yaml.safe_dump(MINIMAL), "my_run.yaml"))
    assert r.name == "my_run" and r.run_dir == Path("runs/my_run")
    assert r.adapter.params.model_dump() == {"rank": 8, "dropout": 0.5, "alpha_init": 1.0, "init": "random"}
    assert r.train.lr == 5e-4 and r.train.scheduler == "linear"


def test_overrides_are_parsed_as_yaml(tmp_path):
    p = write(tmp_path, yaml.safe_dump(MINIMAL))
    r = load_recipe(
        p,
        [
            "train.lr=1e-3",
            "adapter.params.rank=16",
            "adapter.target_modules=[query,key]",
            "data.max_train_samples=100",
            "seed=7",
            "train.max_grad_norm=null",
        ],
    )
    assert r.train.lr == 1e-3 and r.adapter.params.rank == 16 and r.adapter.target_modules == ["query", "key"]
    assert r.data.max_train_samples == 100 and r.seed == 7 and r.train.max_grad_norm is None


def test_a_problem_of_an_override_is_the_overrides_not_the_files(tmp_path):
    """A typo on the command line is named as the override it came from; the recipe file is named only
    for problems that are in it."""
    p = write(tmp_path, yaml.safe_dump(MINIMAL), "mine.yaml")
    with pytest.raises(ConfigError) as only_override:
        load_recipe(p, ["train.lrr=1"])
    assert str(only_override.value).startswith("override 'train.lrr=1': train.lrr: unknown key (did you mean 'lr'?)")
    assert "mine.yaml" not in str(only_override.value)
    p = write(tmp_path, yaml.safe_dump({**MINIMAL, "seed": "x"}), "mine.yaml")
    with pytest.raises(ConfigError) as both:
        load_recipe(p, ["adapter.params.rank=0"])
    lines = str(both.value).splitlines()
    assert lines[0] == f"{p}: 2 problems:"
    assert "  - override 'adapter.params.rank=0': adapter.params.rank: input should be greater than 0 (got 0)" in lines
    assert any(line.startswith("  - seed: input should be a valid integer") for line in lines)


def test_every_problem_is_reported_at_once(tmp_path):
    bad = {
        "model": {"name": "minilm"},
        "data": {"task": "glue/mrcp", "max_lenght": 64},
        "adapter": {"method": "tlora", "params": {"rank": 0, "dropuot": 0.1}},
        "train": {"lr": "fast", "epochs": -1, "lrr": 1},
    }
    with pytest.raises(ConfigError) as e:
        load_recipe(write(tmp_path, yaml.safe_dump(bad)))
    msg = str(e.value)
    for expected in [
        "data.task: unknown task 'glue/mrcp' (did you mean 'glue/mrpc'?)",
        "data.max_lenght: unknown key (did you mean 'max_length'?)",
        "adapter.params.rank: input should be greater than 0 (got 0)",
        "adapter.params.dropuot: unknown key (did you mean 'dropout'?)",
        "train.lr: input should be a valid number",
        "train.epochs: input should be greater than 0",
        "train.lrr: unknown key (did you mean 'lr'?)",
    ]:
        assert expected in msg, msg
    assert len(e.value.problems) == 7


def test_unknown_method_suggests(tmp_path):
    with pytest.raises(ConfigError, match=r"adapter.method: unknown method 'tlroa' \(did you mean 'tlora'\?\)"):
        validate({**MINIMAL, "adapter": {"method": "tlroa"}})


def test_missing_sections_and_conflicts():
    with pytest.raises(ConfigError) as e:
        validate({"data": {"task": "glue/mrpc"}, "train": {"warmup_steps": 10, "warmup_ratio": 0.1}})
    msg = str(e.value)
    assert "model: required" in msg and "adapter: required" in msg
    assert "set train.warmup_steps or train.warmup_ratio, not both" in msg


@pytest.mark.parametrize("name", ["../escape", "a/b", ".hidden", ""])
def test_run_names_cannot_escape_the_output_dir(name):
    with pytest.raises(ConfigError, match="name:"):
        validate({**MINIMAL, "name": name})


def test_yaml_syntax_error_names_line(tmp_path):
    with pytest.raises(LrftError, match=r"r.yaml: YAML syntax error at line \d+, column \d+"):
        load_recipe(write(tmp_path, "model:\n  name: minilm\n  bad: [unclosed\n"))


def test_a_key_given_twice_is_an_error_naming_the_key_and_both_lines(tmp_path):
    text = "model:\n  name: minilm\ndata:\n  task: glue/mrpc\n  max_length: 64\n  task: glue/rte\nadapter: {method: lora}\n"
    with pytest.raises(
        LrftError,
        match=r"key 'task' is given twice in one mapping, at line 4, column 3 and at "
        r"line 6, column 3; keep one of the two",
    ):
        load_recipe(write(tmp_path, text))
    with pytest.raises(LrftError, match=r"override 'data=\{task: a, task: b\}': key 'task' is given twice"):
        apply_overrides({}, ["data={task: a, task: b}"])


def test_merge_keys_may_still_be_overridden(tmp_path):
    """`<<: *base` then a key of its own is YAML's way to override, not a key given twice."""
    text = (
        "base: &b {name: minilm, dtype: float32}\nmodel:\n  <<: *b\n  dtype: bfloat16\ndata: {task: glue/mrpc}\n"
        "adapter: {method: lora}\n"
    )
    with pytest.raises(ConfigError, match="base: unknown key"):  # parsed: only the extra top-level key is refused
        load_recipe(write(tmp_path, text))
    assert parse_yaml(text, "r.yaml")["model"] == {"name": "minilm", "dtype": "bfloat16"}


def test_missing_file_and_non_mapping(tmp_path):
    with pytest.raises(LrftError, match="recipe: no file at"):
        load_recipe(tmp_path / "nope.yaml")
    with pytest.raises(LrftError, match="a recipe is a YAML mapping"):
        load_recipe(write(tmp_path, "- a\n- b\n"))


@pytest.mark.parametrize("bad", ["novalue", "=3", "a..b=1"])
def test_bad_override_syntax(bad):
    with pytest.raises(LrftError, match="expected key=value"):
        apply_overrides({}, [bad])


def test_override_into_scalar_is_refused():
    with pytest.raises(LrftError, match="'seed' is not a section"):
        apply_overrides({"seed": 1}, ["seed.x=2"])


def test_commented_yaml_round_trips():
    r = validate({**MINIMAL, "name": "x"})
    text = commented_yaml(r, ["header"])
    assert text.startswith("# header") and "# rank r of the low-rank update" in text
    assert validate(yaml.safe_load(text)).model_dump() == r.model_dump()


@pytest.mark.parametrize("path", RECIPES, ids=[p.name for p in RECIPES])
def test_shipped_recipes_validate(path):
    r = load_recipe(path)
    assert r.name == path.stem
    text = path.read_text()
    assert text.startswith("#") and "lrft train recipes/" in text, "recipes open with a comment showing the run command"


# ------------------------------------------------------------------- the config toolkit, any schema


class Circle(Section):
    kind: Literal["circle"]
    radius: float = Field(1.0, gt=0, description="the radius")


class Square(Section):
    kind: Literal["square"]
    side: float = Field(1.0, gt=0, description="the side")


class Drawing(Section):
    colour: Literal["red", "green", "blue"] = Field("red", description="the pen")
    shape: Annotated[Circle | Square, Field(discriminator="kind")]


def drawing_problems(raw: dict, **conventions) -> list[str]:
    with pytest.raises(ConfigError) as e:
        validated(Drawing, raw, "d.yaml", whole="drawing", **conventions)
    return e.value.problems


def test_problem_lines_follow_any_schema_and_its_unions():
    """What recipes get (variant tags dropped from keys, the discriminator's unknown value with a
    did-you-mean, the keys of the chosen variant) comes from the schema, not from knowing a recipe."""
    assert drawing_problems({"shape": {"kind": "circel"}}) == [
        "shape.kind: unknown kind 'circel' (did you mean 'circle'?); choose one of: circle, square"
    ]
    assert drawing_problems({"shape": {"kind": "square", "sied": 2, "side": 0}}) == [
        "shape.side: input should be greater than 0 (got 0)",
        "shape.sied: unknown key (did you mean 'side'?); known keys here: kind, side",
    ]
    assert drawing_problems({"shape": {}, "color": "red"}) == [
        "shape.kind: required, but missing",
        "color: unknown key (did you mean 'colour'?); known keys here: colour, shape",
    ]
    assert drawing_problems({"shape": {"kind": "circle"}, "colour": "reed"}) == [
        "colour: input should be 'red', 'green' or 'blue' (got 'reed')"
    ]
    assert drawing_problems({"shape": {"kind": "circle"}, "colour": "reed"}, named_choices=["colour"]) == [
        "colour: unknown colour 'reed' (did you mean 'red'?); choose one of: red, green, blue"
    ]


def test_dotted_keys_get_and_pop():
    tree = {"train": {"lr": 1.0, "epochs": 2}, "seed": 3}
    assert dotted_get(tree, "train.lr") == 1.0 and dotted_get(tree, "train.lr.x") is None
    dotted_pop(tree, "train.lr")
    dotted_pop(tree, "seed")
    dotted_pop(tree, "nothing.here")
    assert tree == {"train": {"epochs": 2}}


def test_the_recipe_reference_is_generated_from_the_schema():
    """docs/recipe-reference.md is what `python docs/generate.py` makes of the schema: after changing a
    field, regenerate it."""
    committed = (ROOT / "docs" / "recipe-reference.md").read_text(encoding="utf-8")
    assert committed == docs_generator().recipe_reference(), "run: python docs/generate.py"


def test_the_reference_describes_each_key_as_init_comments_it():
    reference = docs_generator().recipe_reference()
    for method in methods.REGISTRY:
        recipe = validate({**MINIMAL, "adapter": {"method": method}})
        comments = [line.split("  # ", 1)[1] for line in commented_yaml(recipe, []).splitlines() if "  # " in line]
        assert len(comments) > 40 and all(markdown_text(c) in reference for c in comments), method


def test_generate_check_names_a_page_that_differs(tmp_path, monkeypatch, capsys):
    generate = docs_generator()
    monkeypatch.setattr(generate, "ROOT", tmp_path)
    (tmp_path / "docs").mkdir()
    for name in ("ARCHITECTURE.md", "layers.yaml"):  # the architecture page is prose around a generated table
        shutil.copy(ROOT / "docs" / name, tmp_path / "docs" / name)
    page = tmp_path / "docs" / "ARCHITECTURE.md"
    page.write_text(page.read_text(encoding="utf-8").replace("| 0 |", "| zero |"), encoding="utf-8")
    assert generate.main(["--check"]) == 1
    err = capsys.readouterr().err
    assert "docs/recipe-reference.md: differs" in err and "docs/ARCHITECTURE.md: differs" in err
    assert generate.main([]) == 0 and generate.main(["--check"]) == 0
    assert (tmp_path / "docs" / "recipe-reference.md").read_text(encoding="utf-8") == generate.recipe_reference()
