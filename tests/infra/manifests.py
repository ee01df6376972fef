"""infra/'s manifests read as the tests check them: documents, pod templates, containers, and the
`rayquant` command lines they and the Dockerfile run."""

from __future__ import annotations

import shlex
from dataclasses import dataclass
from pathlib import Path

import dockerfile
import yaml

ROOT = Path(__file__).resolve().parents[2]
INFRA = ROOT / "infra"
DOCKERFILE = INFRA / "Dockerfile"
KUBERAY_KINDS = ("RayCluster", "RayJob")
# what `sh -c` treats as the end of one simple command, and redirections (they take the next word)
COMMAND_SEPARATORS = {"&&", "||", ";", "|", "&"}
REDIRECTIONS = {">", ">>", "<", "&>"}


@dataclass(frozen=True)
class Manifest:
    path: Path
    doc: dict

    @property
    def name(self) -> str:
        return f"{self.path.name}:{self.doc['kind']}/{self.doc['metadata']['name']}"


@dataclass(frozen=True)
class PodTemplate:
    where: str  # "rayjob.yaml:RayJob/name head", for test ids and messages
    role: str  # "head", "worker" or "job"
    template: dict  # a core/v1 PodTemplateSpec


@dataclass(frozen=True)
class CliCommand:
    where: str
    argv: list[str]  # the words after `rayquant`


def manifests() -> list[Manifest]:
    """Every document of every infra/*.yaml, in file order."""
    found = []
    for path in sorted(INFRA.glob("*.yaml")):
        with path.open(encoding="utf-8") as f:
            found += [Manifest(path, doc) for doc in yaml.safe_load_all(f) if doc is not None]
    return found


def ray_cluster_spec(doc: dict) -> dict | None:
    """The RayClusterSpec of a RayCluster or of a RayJob's own cluster; None for other kinds."""
    if doc["kind"] == "RayCluster":
        return doc["spec"]
    if doc["kind"] == "RayJob":
        return doc["spec"]["rayClusterSpec"]
    return None


def pod_templates(manifest: Manifest) -> list[PodTemplate]:
    """The pod templates a manifest makes pods from (none for a PersistentVolumeClaim)."""
    doc = manifest.doc
    if doc["kind"] == "CronJob":
        return [PodTemplate(f"{manifest.name} job", "job", doc["spec"]["jobTemplate"]["spec"]["template"])]
    cluster = ray_cluster_spec(doc)
    if cluster is None:
        return []
    head = [PodTemplate(f"{manifest.name} head", "head", cluster["headGroupSpec"]["template"])]
    return head + [PodTemplate(f"{manifest.name} {group['groupName']}", "worker", group["template"])
                   for group in cluster.get("workerGroupSpecs", [])]


def all_pod_templates() -> list[PodTemplate]:
    return [t for m in manifests() for t in pod_templates(m)]


def shell_commands(line: str) -> list[list[str]]:
    """The simple commands of a shell line, as words, without their redirections."""
    lexer = shlex.shlex(line, posix=True, punctuation_chars=True)
    lexer.whitespace_split = True
    commands, words, skip_next = [], [], False
    for word in lexer:
        if skip_next:
            skip_next = False
        elif word in COMMAND_SEPARATORS:
            commands, words = commands + [words], []
        elif word in REDIRECTIONS:
            skip_next = True
        else:
            words.append(word)
    return [c for c in commands + [words] if c]


def rayquant_commands() -> list[CliCommand]:
    """Every `rayquant ...` the manifests (container command/args, RayJob entrypoints) and the
    Dockerfile's RUN lines run."""
    lines: list[tuple[str, list[list[str]]]] = []
    for manifest in manifests():
        if manifest.doc["kind"] == "RayJob":
            lines.append((f"{manifest.name} entrypoint", shell_commands(manifest.doc["spec"]["entrypoint"])))
        for pod in pod_templates(manifest):
            for c in pod.template["spec"]["containers"]:
                argv = c.get("command", []) + c.get("args", [])
                if argv[:2] in (["sh", "-c"], ["bash", "-c"], ["/bin/bash", "-c"], ["/bin/sh", "-c"]):
                    lines.append((f"{pod.where} {c['name']}", shell_commands(" ".join(argv[2:]))))
                elif argv:
                    lines.append((f"{pod.where} {c['name']}", [argv]))
    for instruction in dockerfile.parse_file(str(DOCKERFILE)):
        if instruction.cmd.upper() == "RUN":
            lines.append((f"Dockerfile:{instruction.start_line}", shell_commands(" ".join(instruction.value))))
    commands = [(where, words[1:] if words[0] == "exec" else words) for where, found in lines for words in found]
    return [CliCommand(where, words[1:]) for where, words in commands if words and words[0] == "rayquant"]
