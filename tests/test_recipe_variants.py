"""Recipes as typed variants keep schema 2's canonical JSON and content hash."""

from __future__ import annotations

import json
import sqlite3
from pathlib import Path

import pytest
from pydantic import ValidationError

from evomerge.workers.recipe import MergeRecipe, RouteRecipe, SourceRecipe, parse_recipe

DATA = Path(__file__).parent / "data"


def test_stored_recipes_of_the_single_class_read_back_byte_identical() -> None:
    # Written by the one-class Recipe of 0.1.x: sources, merges (layer groups, transforms), routes with members.
    for case in json.loads((DATA / "recipes-schema2.json").read_text()):
        recipe = parse_recipe(case["json"])
        assert recipe.to_json() == case["json"] and recipe.content_hash == case["hash"]


def test_the_released_study_database_reads_unchanged() -> None:
    with sqlite3.connect(DATA / "evomerge-0.1.0.db") as db:
        rows = db.execute("select recipe_json, recipe_hash from evomerge_candidates").fetchall()
    kinds = set()
    for text, digest in rows:
        recipe = parse_recipe(text)
        kinds.add(type(recipe))
        assert (recipe.to_json(), recipe.content_hash) == (text, digest)
    assert {SourceRecipe, MergeRecipe} <= kinds


def test_a_merge_is_completed_and_checked_when_built() -> None:
    merge = MergeRecipe(method="ties", base="base", models=("a", "b"))
    assert merge.params == {"density": {"a": (0.5,), "b": (0.5,)}, "weight": {"a": (0.5,), "b": (0.5,)}}
    assert merge.shared == {"scale": (1.0,)}
    assert MergeRecipe(**merge.model_dump()).content_hash == merge.content_hash  # completion is idempotent
    with pytest.raises(ValidationError, match="slerp merges exactly 1 expert"):
        MergeRecipe(method="slerp", base="base", models=("a", "b"))
    with pytest.raises(ValidationError, match="transform lines needs a task-vector method"):
        MergeRecipe(method="slerp", base="base", models=("a",), transforms=("lines",))
    with pytest.raises(ValidationError, match="unknown merge method 'nope'"):
        MergeRecipe(method="nope", base="base", models=("a",))


def test_a_variant_refuses_another_variants_fields() -> None:
    with pytest.raises(ValidationError, match="method"):
        parse_recipe('{"kind": "source", "source": "a", "method": "ties"}')
    with pytest.raises(ValidationError):
        SourceRecipe(source="")
    with pytest.raises(ValidationError, match="first being its base"):
        RouteRecipe(base="b", models=("a", "b"))


def test_each_variant_names_the_sources_it_reads() -> None:
    ps = MergeRecipe(method="task_arithmetic", base="base", models=("a", "b"))
    route = RouteRecipe(base="ps", models=("ps", "c"), members={"ps": ps}, route=(("ps", 0), ("c", 1)), scales=(1, 1))
    assert SourceRecipe(source="a").sources() == ("a",)
    assert ps.sources() == ("base", "a", "b")
    assert route.sources() == ("base", "a", "b", "c")
    assert route.head() == ps and route.collection().route == ()
