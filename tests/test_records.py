"""Run records: schema, atomic writing, and the reader's refusal of malformed or unfinished records."""
import json

import pytest
import torch

from attn2d import records
from attn2d.bench import max_over_ranks
from attn2d.config import compose
from attn2d.records import RecordError, RecordWriter, read_record

CELL = {"experiment": "t", "model": "tiny", "attention": "attn2d", "rows": 2, "cols": 2, "world_size": 4,
        "nodes": 1, "gpus_per_node": 0, "seq_len": 64, "batch_size": 1, "dtype": "float32", "device": "cpu"}
HEADER = {"cell": CELL, "config": {"model": {"name": "tiny"}}, "versions": {"torch": "2.13.0"}, "hosts": ["a"] * 4,
          "devices": ["cpu"] * 4, "git_rev": None, "started_at": "2026-11-23T12:00:00+00:00"}


def step(i, **kw):
    comm = max_over_ranks([{"bytes_sent": 10 * r, "bytes_received": 10 * r, "messages": r,
                            "by_op": {"q_row_all_gather": {"bytes_sent": 10 * r, "bytes_received": 10 * r,
                                                           "messages": r}}}
                           for r in range(4)])
    return {"step": i, "step_time_s": 0.5, "tokens_per_s": 128.0, "tflops_per_gpu": 0.001, "mfu": None,
            "max_mem_gib": 0.3, "loss": 5.5, **comm, **kw}


def test_round_trip(tmp_path):
    path = records.write(tmp_path / "run", HEADER, [step(1), step(2)], config_yaml="model: {name: tiny}\n")
    rec = read_record(tmp_path / "run")
    assert rec.path == path and rec.ok and rec.cell == CELL and [s["step"] for s in rec.steps] == [1, 2]
    assert rec.steps[0]["comm_bytes_sent"] == 30 and rec.steps[0]["comm_by_op"]["q_row_all_gather"]["messages"] == 3
    assert (tmp_path / "run" / "config.yaml").read_text() == "model: {name: tiny}\n"
    assert read_record(path).end == rec.end
    assert records.find_records(tmp_path) == [path]


def test_writer_is_atomic_and_partial_is_never_read(tmp_path):
    w = RecordWriter(tmp_path)
    w.header(HEADER)
    w.step(step(1))
    assert not (tmp_path / records.METRICS).exists() and (tmp_path / records.PARTIAL).exists()
    with pytest.raises(RecordError, match=r"metrics\.jsonl\.partial: the run has not finished"):
        read_record(tmp_path)
    with pytest.raises(RecordError, match=r"metrics\.jsonl\.partial: is a partial record"):
        read_record(tmp_path / records.PARTIAL)
    assert records.find_records(tmp_path) == []
    w.end("ok")
    assert not (tmp_path / records.PARTIAL).exists() and read_record(tmp_path).ok


def test_failed_run_before_header_still_writes_a_valid_record(tmp_path):
    w = RecordWriter(tmp_path, fallback_header=HEADER)
    w.end("failed", "ConfigError: grid 2x2 needs 4 ranks, but the world has 1")
    rec = read_record(tmp_path)
    assert rec.status == "failed" and rec.steps == [] and "needs 4 ranks" in rec.end["reason"]


def test_rerun_replaces_the_old_record_and_disabled_writer_writes_nothing(tmp_path):
    records.write(tmp_path, HEADER, [step(1)])
    w = RecordWriter(tmp_path)  # a new run in the same directory: the old complete record is gone at once
    assert not (tmp_path / records.METRICS).exists()
    w.end("failed", "killed")
    other = tmp_path / "rank1"
    RecordWriter(other, enabled=False).end("ok")
    assert not other.exists()


def test_non_finite_loss_is_written_as_null(tmp_path):
    records.write(tmp_path, HEADER, [step(1, loss=float("nan"))])
    assert read_record(tmp_path).steps[0]["loss"] is None


def _lines(tmp_path):
    return (tmp_path / records.METRICS).read_text().splitlines()


@pytest.mark.parametrize("damage,problem", [
    (lambda ls: ls[:1] + ["{not json"] + ls[1:], r"line 2 is not JSON"),
    (lambda ls: [ls[1]] + ls[:1] + ls[2:], r"line 1 must be the header"),
    (lambda ls: ls[:-1], r"has no end line"),
    (lambda ls: ls + [ls[1]], r"line 4 comes after the end line"),
    (lambda ls: [ls[0], json.dumps({**json.loads(ls[1]), "step_time_s": -1.0}), *ls[2:]],
     r"line 2 \(step\): step_time_s"),
    (lambda ls: [ls[0], json.dumps({k: v for k, v in json.loads(ls[1]).items() if k != "comm_messages"}), *ls[2:]],
     r"line 2 \(step\).*'comm_messages' is a required property"),
    (lambda ls: [json.dumps({**json.loads(ls[0]), "cell": {**CELL, "rows": "2"}}), *ls[1:]],
     r"line 1 \(header\): cell/rows"),
    (lambda ls: [*ls[:-1], json.dumps({**json.loads(ls[-1]), "status": "done"})], r"line 3 \(end\): status"),
    (lambda ls: [ls[0], ls[-1]], r"status ok but no step lines"),
    (lambda ls: [ls[0], ls[1], ls[1], ls[-1]], r"step 1 does not follow step 1"),
])
def test_malformed_records_are_rejected_naming_the_file(tmp_path, damage, problem):
    records.write(tmp_path, HEADER, [step(1)])
    (tmp_path / records.METRICS).write_text("\n".join(damage(_lines(tmp_path))) + "\n")
    with pytest.raises(RecordError, match=str(tmp_path / records.METRICS).replace(".", r"\.") + ".*" + problem):
        read_record(tmp_path)


def test_missing_record(tmp_path):
    with pytest.raises(RecordError, match="no such record"):
        read_record(tmp_path)


@pytest.mark.parametrize("constant", ["NaN", "Infinity", "-Infinity"])
def test_non_finite_numbers_are_rejected_with_file_and_line(tmp_path, constant):
    """json.loads reads NaN/Infinity by default; a record holding one is refused, not read as ok with a blank or
    inf time (issue: a NaN step time showed as "1 cells, 0 failed")."""
    records.write(tmp_path, HEADER, [step(1), step(2)])
    lines = _lines(tmp_path)
    lines[2] = lines[2].replace('"step_time_s": 0.5', f'"step_time_s": {constant}')
    assert constant in lines[2]
    (tmp_path / records.METRICS).write_text("\n".join(lines) + "\n")
    with pytest.raises(RecordError, match=str(tmp_path / records.METRICS).replace(".", r"\.")
                       + f": line 3 holds the non-finite number {constant}"):
        read_record(tmp_path)


def test_cell_holds_the_schemas_fields_in_its_order():
    """records.cell is the one definition of a header's cell: the schema's fields, in its order, every required
    one given (null where unknown), the optional grid option where the caller knows it."""
    c = records.cell(**dict(reversed(CELL.items())), grid="2x2")
    assert list(c) == [k for k in records.CELL_FIELDS if k in c] and c["grid"] == "2x2"
    assert list(records.cell(**CELL)) == list(records.CELL_REQUIRED) == list(CELL)
    with pytest.raises(ValueError, match=r"unknown field\(s\) \['gpus'\]"):
        records.cell(**CELL, gpus=4)
    with pytest.raises(ValueError, match=r"missing field\(s\) \['rows'\]"):
        records.cell(**{k: v for k, v in CELL.items() if k != "rows"})


def test_the_header_of_a_composed_config_is_a_valid_header_line():
    h = records.header(compose(["model=tiny", "grid=2x2"]), 4, torch.device("cpu"), None, records.now_iso(),
                       ranks=[{"host": "a", "device": "cpu: X"}] * 2 + [{"host": "b", "device": "cpu: X"}] * 2)
    assert records.validate_line({"kind": "header", **h}) is None
    assert h["cell"] == {**h["cell"], "model": "tiny", "rows": 2, "cols": 2, "world_size": 4, "nodes": 2,
                         "gpus_per_node": 0, "device": "cpu"}
    assert h["hosts"] == ["a", "a", "b", "b"] and h["devices"] == ["cpu: X"] * 4
