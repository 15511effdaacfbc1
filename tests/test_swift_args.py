import json
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from swift_gradpruner.config import GradPruneConfig, GradPruneConfigError
from swift_gradpruner.swift.args import flag_help, parse_gradprune, split_argv
from swift_gradpruner.swift.phases import drop_flags


def test_split_takes_out_only_gradprune_flags_in_every_form():
    argv = ["--model", "m", "--gradprune", "--lora_rank", "4", "--gradprune_topp=0.3", "--dataset", "a", "b",
            "--gradprune_merge_layers", "1", "--gradprune_prune_layers", "5"]  # fmt: skip
    ours, rest = split_argv(argv)
    assert rest == ["--model", "m", "--lora_rank", "4", "--dataset", "a", "b"]
    assert ours == {"gradprune": "true", "gradprune_topp": "0.3", "gradprune_merge_layers": "1",
                    "gradprune_prune_layers": "5"}  # fmt: skip
    enabled, config = parse_gradprune(ours)
    assert enabled and config == GradPruneConfig(topp=0.3, merge_layers=1, prune_layers=5)


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--gradprune_topp"], "--gradprune_topp needs a value, e.g. --gradprune_topp 0.2"),
        (["--gradprune_steps", "--model", "m"], "--gradprune_steps needs a value"),
        (["--gradprune_topp", "0.1", "--gradprune_topp=0.2"], "--gradprune_topp is given twice"),
    ],
)
def test_split_errors(argv, message):
    with pytest.raises(GradPruneConfigError, match=message):
        split_argv(argv)


@pytest.mark.parametrize(
    "raw, message",
    [
        ({"gradprune": "maybe"}, "--gradprune 'maybe' is not true or false"),
        ({"gradprune_prune_layer": "3"}, "unknown flag --gradprune_prune_layer; valid GradPruner flags: --gradprune,"),
        ({"gradprune_steps": "1.5"}, "--gradprune_steps '1.5' is not a valid int, e.g. --gradprune_steps 40"),
        ({"gradprune_prune_ratio": "lots"}, "--gradprune_prune_ratio 'lots' is not a valid float"),
        ({"gradprune_topp": "2"}, "gradprune topp=2.0 is invalid: must be in (0, 1]"),
        ({"gradprune_benchmark": "fast"}, "--gradprune_benchmark 'fast' is not true or false"),
    ],
)
def test_parse_errors_name_the_flag(raw, message):
    with pytest.raises(GradPruneConfigError) as info:
        parse_gradprune({"gradprune": "true", **raw})
    assert message in str(info.value)


def test_values_from_yaml_strings():
    # `swift sft x.yaml` turns `gradprune_steps: null` into the string "None" and booleans into "True".
    enabled, config = parse_gradprune({"gradprune": "True", "gradprune_steps": "None", "gradprune_prune_ratio": "0.3"})
    assert enabled and config.steps is None and config.prune_ratio == 0.3
    assert parse_gradprune({"gradprune": "True", "gradprune_benchmark": "False"})[1].benchmark is False
    assert parse_gradprune({"gradprune": "false"})[0] is False


def test_flag_help_covers_every_option():
    flags = [row[0] for row in flag_help()]
    assert flags[0] == "--gradprune"
    assert flags[1:] == [f"--gradprune_{name}" for name in GradPruneConfig().to_dict()]


def test_drop_flags_removes_values_too():
    argv = ["--a", "1", "--resume_from_checkpoint", "ckpt", "--b", "x", "y", "--target_modules=q"]
    assert drop_flags(argv, {"--resume_from_checkpoint", "--target_modules"}) == ["--a", "1", "--b", "x", "y"]


PROBE = textwrap.dedent(
    """
    import json, sys
    import swift.pipelines.train.sft as sft
    import swift_gradpruner._startup as startup
    print(json.dumps({"argv": sys.argv[1:], "sft_main": sft.sft_main.__module__, "pending": startup.PENDING}))
    """
)


def run_probe(tmp_path, script, *argv):
    path = tmp_path / script
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(PROBE)
    out = subprocess.run([sys.executable, str(path), *argv], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    return json.loads(out.stdout.strip().splitlines()[-1])


def test_startup_hook_engages_only_for_swift_sft_with_gradprune_flags(tmp_path):
    """The installed .pth hook, in a real interpreter start-up, as `swift sft` starts its child."""
    argv = ["--model", "m", "--gradprune", "true", "--gradprune_topp", "0.3", "--lora_rank", "4"]
    hooked = run_probe(tmp_path, "swift/cli/sft.py", *argv)
    assert hooked["argv"] == argv  # left for the wrapper to take: an unwrapped swift would reject them loudly
    assert hooked["sft_main"] == "swift_gradpruner.swift.entry"
    assert hooked["pending"] == argv

    plain = run_probe(tmp_path, "swift/cli/sft.py", "--model", "m", "--lora_rank", "4")
    assert plain == {"argv": ["--model", "m", "--lora_rank", "4"], "sft_main": "swift.pipelines.train.sft",
                     "pending": []}  # fmt: skip

    other = run_probe(tmp_path, "other/script.py", *argv)
    assert other["argv"] == argv and other["sft_main"] == "swift.pipelines.train.sft"


def test_version_mismatch_stops_before_anything_else(monkeypatch):
    from swift_gradpruner.swift import entry

    monkeypatch.setattr(entry, "version", lambda name: "4.7.0")
    ran = []
    wrapped = entry.wrap_sft_main(lambda args=None: ran.append(args), ["--gradprune", "false", "--model", "m"])
    expected = r"\[GradPruner\] error: swift-gradpruner supports ms-swift 4.6.x, but ms-swift 4.7.0 is installed"
    with pytest.raises(SystemExit, match=expected):
        wrapped()
    assert not ran  # not even the plain run: the user asked for --gradprune* and should know it was not honoured


@pytest.mark.parametrize("path", sorted((Path(__file__).parent.parent / "examples" / "yaml").glob("*.yaml")))
def test_example_yaml_keys_are_swift_or_gradprune_options(path):
    import dataclasses

    import yaml
    from swift.arguments import SftArguments

    settings = yaml.safe_load(path.read_text())
    ours = {key: str(value) for key, value in settings.items() if key.startswith("gradprune")}
    enabled, _ = parse_gradprune(ours)  # raises on an unknown flag or a bad value
    assert enabled, path.name
    swift_fields = {field.name for field in dataclasses.fields(SftArguments)}
    assert set(settings) - set(ours) <= swift_fields, set(settings) - set(ours) - swift_fields
