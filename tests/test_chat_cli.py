"""qt-chat driven through its real stdin/stdout, as a person at a terminal would."""

import json
import re
import subprocess
import sys

import jsonschema
import pytest

# Bounded: a random model writes whatever the schema allows, so an unbounded string might never end.
SCHEMA = {"type": "object", "properties": {"city": {"type": "string", "maxLength": 10}, "unit": {"enum": ["c", "f"]},
                                           "n": {"type": "integer", "minimum": 0, "maximum": 99}},
          "required": ["city", "unit", "n"], "additionalProperties": False}


def chat(ckpt, lines, *flags):
    return subprocess.run([sys.executable, "-m", "qt_serve.cli", "--model", str(ckpt), "--temperature", "0",
                           "--max-tokens", "12", *flags], input="\n".join(lines) + "\n",
                          capture_output=True, text=True, timeout=300)


def replies(stdout: str) -> list[str]:
    return re.findall(r"bot> (.*?)(?=you> |\n|$)", stdout)


def test_multi_turn_commands_and_eof(tiny_ckpt):
    r = chat(tiny_ckpt, ["To be", "", "/system Be brief.", "again", "/reset", "/bogus", "/help", "last"])
    assert r.returncode == 0, r.stderr
    assert r.stdout.count("bot> ") == 3
    assert "(system prompt set; conversation cleared)" in r.stdout
    assert "(conversation cleared)" in r.stdout and "unknown command /bogus" in r.stdout
    assert "/system TEXT" in r.stdout  # help text
    assert r.stderr.count("tok/s") == 3 and "Traceback" not in r.stderr


def test_overlong_conversation_keeps_running(tiny_ckpt):
    r = chat(tiny_ckpt, ["word " * 200, "short"], "--max-seq-len", "64")
    assert r.returncode == 0
    assert "error: the prompt is" in r.stdout and "(try /reset)" in r.stdout
    assert r.stdout.count("bot> ") == 2  # the second message still gets a reply


def test_json_schema_constrains_every_reply(tiny_ckpt, tmp_path):
    path = tmp_path / "weather.json"
    path.write_text(json.dumps(SCHEMA))
    # Sampled at temperature 1: the random model's free text is not JSON, so only the grammar makes it so.
    r = chat(tiny_ckpt, ["Weather in Paris?", "And in Tokyo?", "/reset", "Oslo?"], "--json-schema", str(path),
             "--temperature", "1", "--seed", "3", "--max-tokens", "200")
    assert r.returncode == 0, r.stderr
    got = replies(r.stdout)
    assert len(got) == 3 and "may be incomplete" not in r.stderr
    for text in got:
        jsonschema.validate(json.loads(text), SCHEMA)
    assert len(set(got)) > 1


def test_json_object_mode(tiny_ckpt):
    r = chat(tiny_ckpt, ["Hi", "Again"], "--json", "--max-tokens", "200")
    assert r.returncode == 0, r.stderr
    assert [type(json.loads(t)) for t in replies(r.stdout)] == [dict, dict]


@pytest.mark.parametrize("content, problem", [
    (None, "cannot read it (No such file or directory)"),
    ("{oops", "not JSON: Expecting property name"),
    ("[1, 2]", "a JSON schema is an object"),
    (json.dumps({"type": "text"}), "Invalid type: text"),
    (json.dumps({"type": "string", "format": "zip-code"}), "Unknown format: zip-code"),  # not enforceable
])
def test_bad_schema_files_are_named(tiny_ckpt, tmp_path, content, problem):
    path = tmp_path / "schema.json"
    if content is not None:
        path.write_text(content)
    r = chat(tiny_ckpt, ["Hi"], "--json-schema", str(path))
    assert r.returncode == 2 and "bot> " not in r.stdout
    assert r.stderr.startswith(f"error: --json-schema {path}: ") and problem in r.stderr, r.stderr
    assert "Traceback" not in r.stderr


def test_json_flags_exclude_each_other(tiny_ckpt, tmp_path):
    r = chat(tiny_ckpt, [], "--json", "--json-schema", str(tmp_path / "x.json"))
    assert r.returncode == 2 and "not allowed with argument" in r.stderr
