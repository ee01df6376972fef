from pathlib import Path

import pytest

from rayquant.jobs.spec import JobSpec, SpecError, load_spec

SPECS = Path(__file__).resolve().parents[2] / "jobs" / "specs"


def test_default_spec_matches_design_defaults():
    spec = JobSpec()
    assert (spec.quant.bits, spec.quant.group_size, spec.quant.desc_act, spec.quant.sym) == (4, 128, False, True)
    assert (spec.quant.damp_percent, spec.quant.damp_auto_increment) == (0.01, 0.01)
    assert (spec.calibration.n_samples, spec.calibration.seq_len, spec.calibration.eval_samples) == (128, 2048, 16)
    assert spec.cluster.address is None and spec.cluster.num_workers == 2
    assert spec.model.source == "synthetic://llama-tiny"


def test_shipped_spec_loads_and_set_overrides_nested_fields():
    spec = load_spec(SPECS / "tiny-llama.yaml", ["quant.bits=8", "quant.desc_act=true", "cluster.num_workers=1"])
    assert spec.quant.bits == 8 and spec.quant.desc_act is True and spec.cluster.num_workers == 1
    assert spec.calibration.seq_len == 256  # from the file, untouched


@pytest.mark.parametrize(
    "override, fix",
    [
        ("quant.bitz=4", "unknown key"),
        ("quant.bits=5", "use 2, 3, 4 or 8"),
        ("quant.group_size=0", "use -1"),
        ("quant.damp_percent=0", "quant.damp_percent"),
        ("calibration.n_samples=1", "raise calibration.n_samples or lower cluster.num_workers"),
        ("output.uri=gs://bucket/x", "use a local directory, s3://bucket[/prefix] or hf://org/name"),
        ("output.uri=hf://just-a-name", "hf://org/name[@branch]"),
        ("cluster.address=ray://head:10001", "set output.shared: true if output.uri is a mount every Ray node sees"),
        ("quant.lm_head=true", "quant.lm_head: false"),
        ("quant.overrides=[{pattern: '(', bits: 8}]", "quant.overrides.0.pattern: pattern '(' is not a valid regular"),
        ("quant.overrides=[{pattern: x, bits: 5}]", "quant.overrides.0.bits: bits=5 is not supported; use 2, 3, 4 or 8"),
        ("quant.overrides=[{pattern: x, group_size: 0}]", "use -1 (one group per row)"),
        ("quant.overrides=[{pattern: x}]", "changes nothing; set bits, group_size or skip: true"),
        ("quant.overrides=[{pattern: x, skip: true, bits: 8}]", "a skipped module is not quantized"),
        ("quant.overrides=[{pattern: x, colour: red}]", "quant.overrides.0.colour: unknown key"),
    ],
)
def test_invalid_spec_names_field_and_fix(override, fix):
    with pytest.raises(SpecError) as err:
        load_spec(SPECS / "tiny-llama.yaml", [override])
    assert fix in str(err.value)


def test_missing_spec_file_and_malformed_override(tmp_path):
    with pytest.raises(SpecError, match="does not exist"):
        load_spec(tmp_path / "nope.yaml")
    with pytest.raises(SpecError, match="key.path=value"):
        load_spec(None, ["quant.bits"])


def test_fingerprint_ignores_output_location_but_not_quantization():
    a = load_spec(None, ["output.uri=/tmp/a"])
    b = load_spec(None, ["output.uri=/tmp/b"])
    c = load_spec(None, ["quant.bits=8"])
    assert a.fingerprint("rev") == b.fingerprint("rev")
    assert a.fingerprint("rev") != c.fingerprint("rev")
    assert a.fingerprint("rev") != a.fingerprint("other-revision")


def _leaf_paths(node: dict, prefix: str = "") -> set[str]:
    paths = set()
    for key, value in node.items():
        path = f"{prefix}{key}"
        paths |= _leaf_paths(value, f"{path}.") if isinstance(value, dict) else {path}
    return paths


def test_example_spec_lists_every_key_at_its_default() -> None:
    import yaml

    from rayquant.jobs.cli import EXAMPLE_SPEC

    raw = yaml.safe_load(EXAMPLE_SPEC.read_text())
    assert load_spec(EXAMPLE_SPEC) == JobSpec()  # the annotated values are the defaults
    assert _leaf_paths(raw) == _leaf_paths(JobSpec().model_dump(mode="json"))  # and no key is left out


def test_a_remote_cluster_writes_into_an_output_declared_shared():
    spec = load_spec(SPECS / "tiny-llama.yaml", ["cluster.address=ray://head:10001", "output.shared=true"])
    assert spec.output.shared and "shared" not in spec.resolved().get("output", {})  # where, not what: no fingerprint change


def test_desc_act_turns_group_aware_order_off_in_the_spec_itself():
    """One decision for the two solve orders: desc_act wins, and the resolved spec (fingerprint, manifest)
    says so, as the solver's config does."""
    spec = load_spec(SPECS / "tiny-llama.yaml", ["quant.desc_act=true"])
    assert spec.quant.act_group_aware is False and spec.resolved()["quant"]["act_group_aware"] is False
    assert load_spec(SPECS / "tiny-llama.yaml", []).quant.act_group_aware is True  # the default elsewhere


@pytest.mark.parametrize("override, message", [
    ("quant.bits=5", "quant.bits=5 is not supported; use 2, 3, 4 or 8"),
    ("quant.damp_percent=1.0", "quant.damp_percent=1.0; use a value in (0, 1)"),
    ("quant.damp_auto_increment=-0.1", "quant.damp_auto_increment=-0.1; use a value in [0, 1)"),
])
def test_spec_and_solver_refuse_a_setting_with_the_same_words(override, message):
    from rayquant.solver.gptq import GPTQConfig, InvalidGPTQConfig

    with pytest.raises(SpecError) as spec_err:
        load_spec(SPECS / "tiny-llama.yaml", [override])
    key, value = override.split("=")
    with pytest.raises(InvalidGPTQConfig) as solver_err:
        GPTQConfig(**{key.removeprefix("quant."): float(value) if "." in value else int(value)})
    assert message in str(spec_err.value) and message in str(solver_err.value)



def test_how_long_a_job_waits_and_how_often_it_replaces_workers_is_not_part_of_its_identity() -> None:
    base = load_spec(SPECS / "tiny-llama.yaml")
    patient = load_spec(SPECS / "tiny-llama.yaml", ["cluster.rendezvous_timeout_s=300", "cluster.collective_timeout_s=60",
                               "cluster.max_worker_restarts=0"])
    assert patient.cluster.max_worker_restarts == 0 and base.cluster.max_worker_restarts == 3
    assert patient.fingerprint("rev") == base.fingerprint("rev")
    assert "max_worker_restarts" not in patient.resolved()["cluster"]
    assert load_spec(SPECS / "tiny-llama.yaml", ["cluster.num_workers=1"]).fingerprint("rev") != base.fingerprint("rev")
