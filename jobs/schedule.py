"""The schedule `rayquant reconcile` keeps true: watched sources × recipes, each pair one job per source revision.

    sources:                                   # model directories to watch (one revision each, now)
      - uri: hf://org/model@main               # Hub repo at a branch (default main)
      - uri: s3://models/llama-8b              # S3 prefix; revision = hash of the objects' keys and ETags
        name: llama-8b                         # {name} in outputs; default: the URI's last path part
      - uri: /data/models/qwen                 # local directory (relative: to the schedule file)
    recipes:
      - name: w4g128
        spec: {quant: {bits: 4, group_size: 128}, cluster: {num_workers: 4}}   # job spec sections
        output: s3://models-gptq/{name}-{revision12}-w4g128
    claim_stale_after_s: 3600

A recipe's `spec` is any part of a job spec (jobs/specs/example.yaml) except what the pair decides:
model.source, output.uri (the `output` template) and name (`<source name>-<recipe name>`).
"""

from __future__ import annotations

import re
import string
from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError
from rayquant.jobs.spec import JobSpec, SpecError, parse_spec_yaml

# what an output template may name, and what each stands for
PLACEHOLDERS = {
    "name": "the source's name (its `name:`, else the last part of its URI)",
    "recipe": "the recipe's name",
    "revision": "the source revision in full (Hub: commit sha; S3, local: sha256)",
    "revision12": "the first 12 characters of the revision",
    "fingerprint12": "the first 12 characters of the job fingerprint (revision and every setting)",
}
_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*")
# set by the pair itself, never by a recipe
_DECIDED = {("model", "source"): "the schedule's sources", ("output", "uri"): "the recipe's `output` template",
            ("name",): "the source and recipe names"}
_SAMPLE = {"name": "model", "recipe": "recipe", "revision": "0" * 64, "revision12": "0" * 12,
           "fingerprint12": "0" * 12}


class ScheduleError(SpecError):
    """The schedule file is invalid; the message names the field and the fix (a SpecError: the CLI's exit 2)."""


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class WatchedSource(_Strict):
    uri: str  # hf://org/name[@branch] | s3://bucket/prefix | a local directory | synthetic://<preset>
    name: str | None = None  # {name} in output templates and the job name; default: the URI's last part


class Recipe(_Strict):
    name: str  # {recipe} in templates; the job is named <source name>-<recipe name>
    spec: dict[str, Any] = {}  # job spec sections applied to every source: quant, calibration, cluster, output
    output: str  # output.uri template, e.g. s3://models-gptq/{name}-{revision12}-w4g128


class Schedule(_Strict):
    sources: tuple[WatchedSource, ...] = Field(min_length=1)
    recipes: tuple[Recipe, ...] = Field(min_length=1)
    # a claim this old whose job never finished is presumed lost (the submission or the job died) and is
    # taken over by the next reconcile; longer than a job's queueing time, or a queued job is submitted twice
    claim_stale_after_s: float = Field(3600.0, gt=0)


def source_name(source: WatchedSource) -> str:
    """{name} of a watched source: its `name:`, else the repo, prefix or directory name."""
    if source.name is not None:
        return source.name
    rest = source.uri.split("://", 1)[-1].partition("@")[0].rstrip("/")
    return rest.rsplit("/", 1)[-1]


def render_output(template: str, values: dict[str, str]) -> str:
    """The template with every placeholder filled from `values` (keys of PLACEHOLDERS)."""
    return template.format_map(values)


def build_job_spec(recipe: Recipe, name: str, source_uri: str, output_uri: str) -> JobSpec:
    """The pair's JobSpec: the recipe's sections, the source, the rendered output and the job name.

    Raises:
        SpecError: the recipe's sections are not a valid job spec.
    """
    data = _deep_copy(recipe.spec)
    data["name"] = f"{name}-{recipe.name}"
    data.setdefault("model", {})["source"] = source_uri
    data.setdefault("output", {})["uri"] = output_uri
    try:
        return JobSpec.model_validate(data)
    except ValidationError as err:
        from rayquant.jobs.spec import describe_validation_error  # the spec's wording of each field's problem

        raise SpecError(describe_validation_error(err)) from err


def load_schedule(path: Path) -> Schedule:
    """Read and check a schedule YAML: fields, names, templates, and every recipe as a job spec.

    Local source paths are made absolute, relative to the schedule file's directory.

    Raises:
        ScheduleError: the file is missing or not YAML, or a field is unknown or invalid.
    """
    path = Path(path)
    try:
        data = parse_spec_yaml(path.read_text())  # no aliases, no repeated keys: as for specs
    except FileNotFoundError as err:
        raise ScheduleError(f"schedule file {path} does not exist; pass the path of a schedule YAML "
                            "(jobs/specs/schedule-example.yaml)") from err
    except yaml.YAMLError as err:
        raise ScheduleError(f"schedule file {path} is not valid YAML: {err}") from err
    if not isinstance(data, dict):
        raise ScheduleError(f"schedule file {path} must hold a mapping with sources and recipes")
    try:
        schedule = Schedule.model_validate(data)
    except ValidationError as err:
        raise ScheduleError(f"schedule {path}: " + _describe_schedule(err)) from err
    sources = tuple(_absolute(source, path.parent) for source in schedule.sources)
    schedule = schedule.model_copy(update={"sources": sources})
    check_schedule(schedule, str(path))
    return schedule


def check_schedule(schedule: Schedule, where: str = "schedule") -> None:
    """The rules a schedule must meet beyond its fields' types.

    Raises:
        ScheduleError: a bad source URI or name, a duplicate, a template placeholder, or a recipe spec field.
    """
    names = [source_name(s) for s in schedule.sources]
    for i, (source, name) in enumerate(zip(schedule.sources, names, strict=True)):
        _check_source_uri(source.uri, f"{where}: sources[{i}].uri")
        if not _NAME.fullmatch(name):
            raise ScheduleError(f"{where}: sources[{i}] ({source.uri}): name {name!r} may hold only letters, "
                                f"digits, '.', '_' and '-'; set sources[{i}].name")
    _refuse_duplicates([s.uri for s in schedule.sources], f"{where}: sources", "uri")
    _refuse_duplicates(names, f"{where}: sources", "name (set `name:` to tell them apart)")
    _refuse_duplicates([r.name for r in schedule.recipes], f"{where}: recipes", "name")
    for i, recipe in enumerate(schedule.recipes):
        _check_recipe(recipe, f"{where}: recipes[{i}] ({recipe.name})")


def _check_recipe(recipe: Recipe, where: str) -> None:
    if not _NAME.fullmatch(recipe.name):
        raise ScheduleError(f"{where}.name: {recipe.name!r} may hold only letters, digits, '.', '_' and '-'")
    for field in template_fields(recipe.output, f"{where}.output"):
        if field not in PLACEHOLDERS:
            raise ScheduleError(f"{where}.output: unknown placeholder {{{field}}} in {recipe.output!r}; use "
                                + ", ".join(f"{{{p}}}" for p in PLACEHOLDERS))
    for keys, decided_by in _DECIDED.items():
        node: Any = recipe.spec
        for key in keys:
            node = node.get(key) if isinstance(node, dict) else None
        if node is not None:
            raise ScheduleError(f"{where}.spec.{'.'.join(keys)}: set by {decided_by}; remove it from the recipe")
    try:
        build_job_spec(recipe, _SAMPLE["name"], "synthetic://llama-tiny", render_output(recipe.output, _SAMPLE))
    except SpecError as err:
        raise ScheduleError(f"{where}.spec: {str(err).removeprefix('invalid job spec: ')}") from err


def template_fields(template: str, where: str) -> list[str]:
    """The placeholder names of an output template, in order.

    Raises:
        ScheduleError: unbalanced braces, or a placeholder with an index, attribute, conversion or format.
    """
    try:
        parts = list(string.Formatter().parse(template))
    except ValueError as err:
        raise ScheduleError(f"{where}: {template!r} is not a valid template ({err}); write placeholders as "
                            "{name}, and a literal brace as {{ or }}") from err
    fields = []
    for _, field, format_spec, conversion in parts:
        if field is None:
            continue
        if format_spec or conversion or not re.fullmatch(r"\w+", field):
            raise ScheduleError(f"{where}: placeholder {{{field}}} in {template!r} may not carry an index, "
                                "attribute, conversion or format; use a plain one such as {revision12}")
        fields.append(field)
    return fields


def _check_source_uri(uri: str, where: str) -> None:
    scheme, sep, _ = uri.partition("://")
    if not sep:
        return
    try:
        if scheme == "hf":
            from rayquant.storage.hub_files import (
                parse_hub_uri,  # huggingface_hub only with a Hub source
            )

            parse_hub_uri(uri)
        elif scheme == "s3":
            from rayquant.storage.s3_files import (
                parse_s3_prefix,  # boto3 only with an S3 source
            )

            parse_s3_prefix(uri)
        elif scheme != "synthetic":
            raise ValueError(f"{uri!r}: the {scheme}:// scheme cannot be watched")
    except ValueError as err:
        raise ScheduleError(f"{where}: {err}; use hf://org/name[@branch], s3://bucket/prefix or a local "
                            "directory") from err


def _refuse_duplicates(values: list[str], where: str, what: str) -> None:
    seen: set[str] = set()
    for value in values:
        if value in seen:
            raise ScheduleError(f"{where}: two entries share the {what} {value!r}")
        seen.add(value)


def _absolute(source: WatchedSource, base: Path) -> WatchedSource:
    if "://" in source.uri:
        return source
    return source.model_copy(update={"uri": str((base / Path(source.uri).expanduser()).absolute())})


def _describe_schedule(err: ValidationError) -> str:
    lines = []
    for e in err.errors():
        where = "".join(f"[{p}]" if isinstance(p, int) else f".{p}" for p in e["loc"]).lstrip(".") or "schedule"
        if e["type"] == "extra_forbidden":
            lines.append(f"{where}: unknown key; remove it or check its spelling against "
                         "jobs/specs/schedule-example.yaml")
        else:
            lines.append(f"{where}: {e['msg'].removeprefix('Value error, ')}")
    return "; ".join(lines)


def _deep_copy(data: dict) -> dict:
    return yaml.safe_load(yaml.safe_dump(data))
