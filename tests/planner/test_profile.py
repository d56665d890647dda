"""Per-unit profiling on the host's ONNX Runtime CPU backends, and the profile store."""

import dataclasses
import json
import os
import statistics

import pytest
from conftest import EXAMPLES, load_example

import edgeplan
from edgeplan.cli import main
from edgeplan.errors import ArtifactError, EdgeplanError
from edgeplan.planner.profile import (
    FORMAT,
    OP_KINDS,
    ROUNDS,
    TVM_BACKEND,
    ProfileStore,
    UnitProfile,
    choose_rounds,
    fastest_reference_of,
    pinned,
    pinned_cpu,
    profile_units,
    reference_model,
    robust_stats,
    sleeping_pool,
)

TINY = {"n_layer": 2, "d_model": 64, "n_head": 2, "vocab": 128, "seq": 16}


@pytest.fixture(scope="module")
def tiny():
    return load_example("gpt").build(**TINY)


@pytest.fixture(scope="module")
def profiled(tiny):
    model, inputs = tiny
    calls = []
    # extra_rounds: retries during a slow spell only lengthen a test that times nothing exactly
    records = profile_units(model, inputs, threads=(1, 2), repeats=5, extra_rounds=1,
                            progress=lambda done, total, label: calls.append((done, total, label)))
    return records, calls


def test_every_unit_has_a_record_per_backend(profiled):
    records, calls = profiled
    units = list(dict.fromkeys(r.unit for r in records))
    assert units[0] == "tok_emb" and "blocks.0" in units and "blocks.1" in units and units[-1] == "head"
    for backend in ("cpu1", "cpu2"):
        rows = [r for r in records if r.backend == backend]
        assert [r.unit for r in rows] == units
        for r in rows:
            # at least `repeats` runs, more until a round took MIN_ROUND_S
            assert r.device == "host" and r.model == "GPT" and r.repeats >= 5
            assert r.median_s > 0
            assert r.p10_s <= r.median_s <= r.p90_s
            # the quietest round's median is what a predictor learns
            assert 0 < r.quiet_s <= r.p90_s and r.time_s == r.quiet_s
            # the 2-thread pool was timed spinning, as the runtime runs it; one thread has none
            assert r.spinning == (backend == "cpu2") and not sleeping_pool(r)
    block = next(r for r in records if r.unit == "blocks.0")
    # the cut after a transformer block carries no 4-D tensor but the attention mask
    assert 0 <= block.features["cut_nchw_bytes"] < block.features["cut_bytes"]
    assert block.features["flops"] > 0 and block.features["param_bytes"] > 0
    assert block.features["matmul_count"] == 4 and block.features["attention_count"] == 1
    assert all(f"{kind}_count" in block.features and f"{kind}_flops" in block.features
               for kind in OP_KINDS)
    assert sum(block.features[f"{k}_flops"] for k in OP_KINDS) == block.features["flops"]
    # progress: starts at 0, counts up by one to the total
    assert [c[0] for c in calls] == list(range(calls[-1][1] + 1))
    assert calls[-1][1] == len(units) + ROUNDS  # one export per unit, then the timing rounds
    # a unit of microseconds is timed for MIN_ROUND_S per round, so far more than 5 runs
    assert next(r for r in records if r.unit == "tok_emb").repeats > 5


def test_records_carry_the_reference_workloads_time(profiled):
    records, _ = profiled
    for backend in ("cpu1", "cpu2"):
        times = {r.reference_s for r in records if r.backend == backend}
        # one median per thread count and call: the same for every record of a backend
        assert len(times) == 1 and 1e-6 < times.pop() < 1.0


def test_reference_model_computes_two_relu_matmuls():
    import numpy as np
    import onnx
    import onnxruntime as ort
    from onnx import numpy_helper

    model = reference_model()
    assert model == reference_model()  # seeded: the same workload on every host
    weights = {w.name: numpy_helper.to_array(w) for w in onnx.load_from_string(model).graph.initializer}
    x = np.random.default_rng(1).standard_normal((64, 256), dtype=np.float32)
    expected = np.maximum(np.maximum(x @ weights["w1"], 0) @ weights["w2"], 0)
    (got,) = ort.InferenceSession(model, providers=["CPUExecutionProvider"]).run(None, {"x": x})
    np.testing.assert_allclose(got, expected, rtol=1e-4, atol=1e-4)


@pytest.mark.skipif(not hasattr(os, "sched_setaffinity"), reason="no CPU affinity on this platform")
def test_pinned_restores_the_affinity():
    allowed = os.sched_getaffinity(0)
    cpu = pinned_cpu()
    assert cpu == max(allowed)
    with pinned(cpu):
        assert os.sched_getaffinity(0) == {cpu}
    assert os.sched_getaffinity(0) == allowed
    with pytest.raises(RuntimeError), pinned(cpu):
        raise RuntimeError("timing failed")
    assert os.sched_getaffinity(0) == allowed  # restored on errors too
    with pinned(None):
        assert os.sched_getaffinity(0) == allowed


def test_rounds_timed_while_the_machine_ran_slow_are_timed_again():
    fast = {1: 100e-6, 2: 80e-6}
    steady, slow = {1: 105e-6, 2: 82e-6}, {1: 160e-6, 2: 82e-6}  # 5 % and 60 % slower
    assert choose_rounds([steady, steady], fast, rounds=3, extra_rounds=3) is None
    assert choose_rounds([steady, steady, steady], fast, rounds=3, extra_rounds=3) == [0, 1, 2]
    # a round whose 1-thread (pinned) reference ran slow does not count: time another
    assert choose_rounds([steady, slow, steady], fast, rounds=3, extra_rounds=3) is None
    assert choose_rounds([steady, slow, steady, steady], fast, 3, 3) == [0, 2, 3]
    # the 2-thread reference alone does not decide (it swings with the other vCPU's load)
    other_busy = {1: 101e-6, 2: 200e-6}
    assert choose_rounds([steady, other_busy, steady], fast, 3, 3) == [0, 1, 2]
    # the budget spent: keep the least slowed rounds
    slower = {1: 200e-6, 2: 80e-6}
    assert choose_rounds([slower, slow, slower, slow, steady, slower], fast, 3, 3) == [1, 3, 4]
    assert choose_rounds([slow], fast, rounds=1, extra_rounds=0) == [0]  # no retries allowed


def test_the_wait_before_a_round_timed_again_doubles(tiny, monkeypatch):
    """A machine slow through every round (a fastest reference no round can match): each
    retry waits twice as long as the one before, up to MAX_RETRY_WAIT_S."""
    from edgeplan.planner import profile

    waits = []
    monkeypatch.setattr(profile.time, "sleep", waits.append)
    model, inputs = tiny
    records = profile_units(model, inputs, threads=(1,), repeats=1, rounds=1, extra_rounds=6,
                            fastest_reference={1: 1e-9})
    assert waits == [0.5, 1.0, 2.0, 4.0, 8.0, 8.0]
    assert profile.MAX_RETRY_WAIT_S == 8.0 and records and all(r.quiet_s > 0 for r in records)


def test_multi_thread_sessions_are_timed_spinning_as_the_runtime_runs_them(tiny, monkeypatch):
    """A 2-thread pool whose workers sleep between ops ran the held-out CNN's units at
    1.1-1.4x their 1-thread time here, spinning (the runtime's sessions) at 0.65-0.86x: so
    spinning stays on, each round times its 1-thread sessions first, every multi-thread one
    after SPIN_WAKE_RUNS untimed runs, and nothing right after a multi-thread one (its pool
    still spins for SPIN_SETTLE_S)."""
    from edgeplan.planner import profile

    events = []
    real_time_session = profile.time_session

    def recording_time_session(session, feeds, warmup, repeats, min_s=0.0):
        options = session.get_session_options()
        try:
            spinning = options.get_session_config_entry("session.intra_op.allow_spinning")
        except Exception:  # onnxruntime raises when the entry was never set: its default, on
            spinning = "1"
        events.append(("time", options.intra_op_num_threads, warmup, spinning))
        return real_time_session(session, feeds, warmup, repeats, min_s)

    monkeypatch.setattr(profile, "time_session", recording_time_session)
    monkeypatch.setattr(profile.time, "sleep", lambda seconds: events.append(("sleep", seconds)))
    model, inputs = tiny
    records = profile_units(model, inputs, threads=(2, 1), repeats=1, rounds=2, extra_rounds=0)
    assert [r.backend for r in records[:2]] == ["cpu2", "cpu1"]  # the order asked for
    timed = [e for e in events if e[0] == "time"]
    assert {spinning for *_, spinning in timed} == {"1"}
    assert {(threads, warmup) for _, threads, warmup, _ in timed} == {(1, 0), (2, profile.SPIN_WAKE_RUNS)}
    settled = True
    for event in events:
        if event[0] == "sleep":
            settled = settled or event[1] == profile.SPIN_SETTLE_S
        else:
            assert settled, "a session was timed while a 2-thread pool could still spin"
            settled = event[1] == 1
    # every block of timings between pauses runs its 1-thread sessions before its 2-thread ones
    block = []
    for event in [*events, ("sleep", 0.0)]:
        if event[0] == "sleep":
            assert block == sorted(block)
            block = []
        else:
            block.append(event[1])


def test_fastest_reference_of_this_hosts_records(profiled):
    import dataclasses

    records, _ = profiled
    base = records[0]
    rows = [dataclasses.replace(base, backend="cpu1", reference_s=130e-6, host="here"),
            dataclasses.replace(base, backend="cpu1", reference_s=150e-6, host="here"),
            dataclasses.replace(base, backend="cpu2", reference_s=170e-6, host="here"),
            dataclasses.replace(base, backend="cpu1", reference_s=90e-6, host="elsewhere"),
            dataclasses.replace(base, backend="cpu2", reference_s=0.0, host="here"),  # from a run
            dataclasses.replace(base, backend="cpu1", reference_s=80e-6, host="here", device="pi5")]
    assert fastest_reference_of(rows, host="here") == {1: 130e-6, 2: 170e-6}
    assert fastest_reference_of(rows, host="here", device="pi5") == {1: 80e-6}
    # records under a fleet's backend name (profile --backend): counted for its threads
    named = [dataclasses.replace(base, backend="cpu", reference_s=70e-6, host="here", device="pi5")]
    assert fastest_reference_of(rows + named, host="here", device="pi5") == {1: 80e-6}
    assert fastest_reference_of(rows + named, host="here", device="pi5",
                                backend_threads={"cpu": 4}) == {1: 80e-6, 4: 70e-6}
    assert fastest_reference_of([], host="here") == {}
    # profiled here: every backend of the call has its reference
    assert set(fastest_reference_of(records)) == {1, 2}


def test_robust_stats_counts_outliers():
    median, p10, p90, outliers = robust_stats([1.0, 1.1, 0.9, 1.0, 1.05, 0.95, 50.0])
    assert median == 1.0 and p10 <= median <= p90 and outliers == 1
    assert robust_stats([2.0] * 4) == (2.0, 2.0, 2.0, 0)


def test_store_round_trips_and_appends(profiled, tmp_path):
    records, _ = profiled
    store = ProfileStore(tmp_path / "profiles.jsonl")
    store.append(records)
    store.append(records)
    loaded = store.load()
    assert loaded == records + records
    for line in (tmp_path / "profiles.jsonl").read_text().splitlines():
        data = json.loads(line)
        assert data["format"] == FORMAT and data["version"] == 1
    cpu2 = store.for_backend("host", "cpu2")
    assert len(cpu2) == 2 * sum(r.backend == "cpu2" for r in records)
    assert store.for_backend("pi5", "cpu2") == []


def test_corrupt_line_names_file_and_line(profiled, tmp_path):
    records, _ = profiled
    path = tmp_path / "profiles.jsonl"
    store = ProfileStore(path)
    store.append(records[:2])
    with open(path, "a") as out:
        out.write('{"format": "edgeplan-profile", "version": 1, "model": "GPT"')  # cut short
    store.append(records[2:3])  # starts on a fresh line, so only line 3 is damaged
    with pytest.raises(EdgeplanError, match=r"profiles\.jsonl, line 3"):
        store.load()
    path.write_text(json.dumps({**records[0].to_dict(), "median_s": "fast"}) + "\n")
    with pytest.raises(EdgeplanError, match="line 1.*median_s"):
        store.load()
    for name in ("reference_s", "quiet_s"):
        path.write_text(json.dumps({**records[0].to_dict(), name: -1.0}) + "\n")
        with pytest.raises(EdgeplanError, match=f"line 1.*{name}"):
            store.load()
    # a record written before reference_s and quiet_s existed loads, as not measured, and
    # gives its overall median as its time
    older = records[0].to_dict()
    del older["reference_s"], older["quiet_s"]
    path.write_text(json.dumps(older) + "\n")
    loaded = store.load()[0]
    assert loaded.reference_s == 0.0 and loaded.quiet_s == 0.0 and loaded.time_s == loaded.median_s
    path.write_text(json.dumps({**records[0].to_dict(), "spinning": "yes"}) + "\n")
    with pytest.raises(EdgeplanError, match="line 1.*spinning must be true or false"):
        store.load()
    # a 2-thread record of an edgeplan that timed pools sleeping: no "spinning" field
    older = next(r for r in records if r.backend == "cpu2").to_dict()
    del older["spinning"]
    path.write_text(json.dumps(older) + "\n")
    assert sleeping_pool(store.load()[0])
    path.write_text(json.dumps({**records[0].to_dict(), "version": 2}) + "\n")
    with pytest.raises(EdgeplanError, match="line 1.*version 2"):
        store.load()
    with pytest.raises(EdgeplanError, match="no such file"):
        ProfileStore(tmp_path / "missing.jsonl").load()


def test_unit_sum_matches_whole_model(tiny, profiled, tmp_path):
    """Sum of single-thread unit times vs the whole model compiled as one ONNX stage.

    Compared with the stage's busy time inside `Pipeline.run` (the session run itself):
    the run's wall time also pays a fixed ~0.5 ms for starting the pipeline's threads,
    which is no unit's cost and dwarfs this tiny model (printed, not asserted).
    """
    model, inputs = tiny
    records, _ = profiled
    # Quiet figures on both sides (the units' quietest round, the fastest of 15 runs): a
    # slow spell of this shared VM during one side once put the ratio past 3.
    unit_sum = sum(r.time_s for r in records if r.backend == "cpu1")
    edgeplan.compile(model, inputs, fleet="pi-cluster", out_dir=tmp_path, num_stages=1)
    pipe = edgeplan.runtime.load(tmp_path, threads_per_stage=1)
    feeds = {name: value.numpy() for name, value in inputs.items()}
    for _ in range(3):
        pipe.run(feeds)
    stage, wall = [], []
    for _ in range(15):
        pipe.run(feeds)
        stage.append(pipe.last_stats.stage_mean_s[0])
        wall.append(pipe.last_stats.wall_s)
    whole, whole_wall = min(stage), statistics.median(wall)
    ratio = unit_sum / whole
    print(f"\nsum of unit times {unit_sum * 1e3:.3f} ms; whole-model stage {whole * 1e3:.3f} ms "
          f"(ratio {ratio:.2f}); Pipeline.run wall {whole_wall * 1e3:.3f} ms "
          f"(ratio {unit_sum / whole_wall:.2f})")
    assert 1 / 3 <= ratio <= 3


def tiny_gpt_factory(directory):
    """A factory file for the CLI: a one-block GPT."""
    factory = directory / "tiny_gpt.py"
    factory.write_text(
        "from edgeplan.cli import load_module\n"
        f"gpt = load_module({str(EXAMPLES / 'gpt.py')!r})\n"
        "def build():\n"
        "    return gpt.build(n_layer=1, d_model=32, n_head=2, vocab=64, seq=8)\n")
    return factory


def test_cli_profile_writes_store(tmp_path, capsys):
    factory = tiny_gpt_factory(tmp_path)
    store = tmp_path / "out" / "profiles.jsonl"
    code = main(["profile", f"{factory}:build", "--store", str(store), "--threads", "1", "2",
                 "--repeats", "3", "--rounds", "2", "--retries", "1"])
    assert code == 0
    records = ProfileStore(store).load()
    assert {r.backend for r in records} == {"cpu1", "cpu2"}
    assert all(isinstance(r, UnitProfile) and r.model == "tiny_gpt" for r in records)
    captured = capsys.readouterr()
    assert "host/cpu1" in captured.out and "host/cpu2" in captured.out
    assert "total" in captured.out and str(store) in captured.out
    assert "\r" in captured.err
    units = len({r.unit for r in records})
    assert f"] {units + 2}/{units + 2} " in captured.err  # one export per unit, then --rounds 2
    assert "older record" not in captured.err
    # the store as an edgeplan that timed pools sleeping left it, profiled again: the
    # profile says which of its records the predictor now leaves out
    store.write_text("")
    ProfileStore(store).append([dataclasses.replace(r, spinning=False) for r in records])
    assert main(["profile", f"{factory}:build", "--store", str(store), "--threads", "2",
                 "--repeats", "2", "--rounds", "3", "--retries", "0"]) == 0
    older = sum(r.backend == "cpu2" for r in records)
    assert (f"{store} holds {older} older record(s) of host/cpu2 that timed its thread pool sleeping"
            in capsys.readouterr().err)



def test_cli_profile_records_the_fleet_device_it_is_told(tmp_path, capsys):
    """--device: records of another machine go to the store under that fleet device's name,
    beside this host's, and its slow spells are judged by its own records."""
    factory = tiny_gpt_factory(tmp_path)
    store = tmp_path / "profiles.jsonl"
    for device in ("host", "box"):
        assert main(["profile", f"{factory}:build", "--store", str(store), "--threads", "1",
                     "--repeats", "2", "--rounds", "3", "--retries", "0", "--device", device]) == 0
    records = ProfileStore(store).load()
    units = len(records) // 2
    assert [r.device for r in records] == ["host"] * units + ["box"] * units
    assert {r.backend for r in records} == {"cpu1"}
    assert "box/cpu1" in capsys.readouterr().out
    assert set(fastest_reference_of(records, device="box")) == {1}
    # --backend: under the fleet backend's own name (a preset's "cpu"), for one thread count
    assert main(["profile", f"{factory}:build", "--store", str(store), "--threads", "1",
                 "--repeats", "2", "--rounds", "3", "--retries", "0", "--device", "pi5", "--backend", "cpu"]) == 0
    assert [r.backend for r in ProfileStore(store).load() if r.device == "pi5"] == ["cpu"] * units
    assert "pi5/cpu " in capsys.readouterr().out
    assert main(["profile", f"{factory}:build", "--store", str(store), "--threads", "1", "2",
                 "--device", "pi5", "--backend", "cpu"]) == 2
    assert "give one thread count" in capsys.readouterr().err

def test_cli_profile_times_tvm_libraries_too(tmp_path, capsys):
    """--tvm: every unit also built as a TVM library for this host and timed as backend
    tvm1, in the same rounds (same 1-thread reference) as ONNX Runtime's cpu1."""
    pytest.importorskip("tvm")
    factory = tiny_gpt_factory(tmp_path)
    store = tmp_path / "profiles.jsonl"
    assert main(["profile", f"{factory}:build", "--store", str(store), "--threads", "1",
                 "--repeats", "3", "--retries", "1", "--tvm"]) == 0
    records = ProfileStore(store).load()
    units = list(dict.fromkeys(r.unit for r in records))
    assert [(r.unit, r.backend) for r in records] == [(u, b) for u in units for b in ("cpu1", TVM_BACKEND)]
    for cpu, tvm in zip(records[::2], records[1::2]):
        assert tvm.quiet_s > 0 and tvm.features == cpu.features and tvm.reference_s == cpu.reference_s
        assert not tvm.spinning and not sleeping_pool(tvm)  # one thread, no pool
    assert "host/tvm1" in capsys.readouterr().out


def test_a_unit_tvm_cannot_build_is_timed_on_onnx_runtime_only(tmp_path, capsys, monkeypatch):
    """TVM's importer lacks operators ONNX Runtime runs: with --tvm such a unit keeps its
    cpu1 record, has no tvm1 record, and the CLI names it and why; profile_units without
    on_tvm_failure raises the TVM target's error. (Every other unit's "TVM library" is its
    ONNX Runtime session here: the skip is under test, not TVM.)"""
    pytest.importorskip("tvm")
    import edgeplan.planner.profile as profile

    def runner(path, index, onnx_session, feeds):
        if index == 2:
            raise ArtifactError(f"tvm target: importing stage {index} ({path}) failed: AssertionError: "
                                f"emit_te now only supports Tensor that has ShapeExpr shape")
        return profile._TvmRunner(type("Session", (), {"run": lambda self, f: onnx_session.run(None, f)})())

    monkeypatch.setattr(profile, "_tvm_runner", runner)
    factory = tiny_gpt_factory(tmp_path)
    store = tmp_path / "profiles.jsonl"
    assert main(["profile", f"{factory}:build", "--store", str(store), "--threads", "1",
                 "--repeats", "2", "--rounds", "3", "--retries", "0", "--tvm"]) == 0
    records = ProfileStore(store).load()
    units = list(dict.fromkeys(r.unit for r in records))
    failed = units[2]
    assert [(r.unit, r.backend) for r in records] == [
        (u, b) for u in units for b in ("cpu1", TVM_BACKEND) if (u, b) != (failed, TVM_BACKEND)]
    err = capsys.readouterr().err
    assert f"TVM cannot build {failed}, timed on ONNX Runtime only" in err and "ShapeExpr" in err
    gpt = load_example("gpt")
    with pytest.raises(ArtifactError, match="importing stage 2"):
        profile_units(*gpt.build(n_layer=1, d_model=32, n_head=2, vocab=64, seq=8), threads=(1,),
                      repeats=1, rounds=1, tvm=True)
