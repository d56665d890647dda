"""Fleet model, presets, the TOML format and its validation errors."""

import dataclasses
import json
import re

import pytest

from edgeplan.planner import fleet as fleet_module
from edgeplan.planner.fleet import (
    Backend,
    Device,
    Fleet,
    FleetError,
    Link,
    fleet_from_dict,
    list_fleets,
    list_presets,
    load_fleet,
    preset_device,
)

REQUIRED_FLEETS = ("home-lab", "jetson-cluster", "pi-cluster", "phones", "edge-8")
REQUIRED_DEVICES = (
    "raspberry-pi-5-8gb",
    "jetson-orin-nano-8gb",
    "jetson-agx-orin-64gb",
    "snapdragon-8-gen3-phone",
    "tensor-g3-phone",
    "intel-n100-edge-box",
)

BOX = """
[[device]]
name = "box"
memory_gb = 16
  [[device.backend]]
  name = "cpu"
  kind = "cpu"
  peak_gflops = 200
  mem_bandwidth_gbs = 38.4
"""


def write(tmp_path, text, filename="lab.toml"):
    path = tmp_path / filename
    path.write_text(text)
    return path


def docstring_example() -> str:
    return re.search(r"```toml\n(.*?)```", fleet_module.__doc__, re.S).group(1)


# --- presets -------------------------------------------------------------------------------------


def test_required_presets_exist():
    assert set(REQUIRED_FLEETS) <= set(list_fleets())
    assert set(REQUIRED_DEVICES) <= set(list_presets())
    assert all(isinstance(text, str) and text for text in {**list_fleets(), **list_presets()}.values())


@pytest.mark.parametrize("name", sorted(list_fleets()))
def test_preset_fleet_loads_and_round_trips(name):
    fleet = load_fleet(name)
    assert fleet.source == f"preset:{name}"
    assert fleet_from_dict(fleet.to_dict()) == fleet
    # to_dict is JSON-ready and survives a trip through JSON text unchanged.
    assert fleet_from_dict(json.loads(json.dumps(fleet.to_dict()))) == fleet
    assert fleet.slots() == [(d.name, b.name) for d in fleet.devices for b in d.backends]


@pytest.mark.parametrize("kind", sorted(list_presets()))
def test_preset_device_figures_are_positive(kind):
    device = preset_device(kind)
    assert device.name == kind and device.kind == kind
    assert device.memory_bytes > 0 and device.backends
    for backend in device.backends:
        assert backend.kind in ("cpu", "gpu", "npu")
        assert backend.peak_gflops > 0 and backend.mem_bandwidth_gbs > 0
        assert 0 < backend.efficiency <= 1 and backend.op_overhead_us >= 0
        assert backend.execution_providers and all(backend.execution_providers)


def test_preset_fleet_shapes():
    home = load_fleet("home-lab")
    kinds = {device.kind for device in home.devices}
    assert {"raspberry-pi-5-8gb", "jetson-orin-nano-8gb", "intel-n100-edge-box",
            "snapdragon-8-gen3-phone"} <= kinds
    phone = next(d.name for d in home.devices if d.kind == "snapdragon-8-gen3-phone")
    wired = [d.name for d in home.devices if d.name != phone]
    assert home.link(wired[0], wired[1]).bandwidth_bytes_s == 125e6
    assert home.link(phone, wired[0]).bandwidth_bytes_s < 125e6  # Wi-Fi

    jetsons = load_fleet("jetson-cluster")
    assert [d.name for d in jetsons.devices] == [f"orin-nano-{i}" for i in range(4)]
    assert {d.kind for d in jetsons.devices} == {"jetson-orin-nano-8gb"}
    assert len(load_fleet("pi-cluster").devices) == 4

    edge = load_fleet("edge-8")
    assert len(edge.devices) == 8
    assert sum(d.memory_bytes for d in edge.devices) > 7e9 * 4  # 7B fp32 weights


def test_datasheet_figures():
    pi = preset_device("raspberry-pi-5-8gb")
    assert pi.backend("cpu").peak_gflops == pytest.approx(4 * 2.4 * 16)
    assert [b.name for b in pi.backends] == ["cpu"]
    nano = preset_device("jetson-orin-nano-8gb")
    assert nano.backend("gpu").peak_gflops == pytest.approx(1024 * 2 * 0.625)
    assert nano.backend("cpu").peak_gflops == pytest.approx(6 * 1.5 * 16)
    assert nano.backend("gpu").execution_providers[0] == "CUDAExecutionProvider"
    agx = preset_device("jetson-agx-orin-64gb")
    assert agx.backend("gpu").mem_bandwidth_gbs == pytest.approx(204.8)
    assert preset_device("intel-n100-edge-box").backend("cpu").peak_gflops == pytest.approx(217.6)
    assert preset_device("snapdragon-8-gen3-phone").backend("npu").execution_providers[0] == "QNNExecutionProvider"
    assert preset_device("tensor-g3-phone").backend("npu").execution_providers[0] == "NnapiExecutionProvider"


def test_preset_device_overrides():
    device = preset_device("jetson-orin-nano-8gb", name="nano", memory_gb=4, address="10.0.0.9:7000",
                           only_backends=["gpu"], backend=[{"name": "gpu", "efficiency": 0.9}])
    assert device.name == "nano" and device.kind == "jetson-orin-nano-8gb"
    assert device.memory_bytes == 4_000_000_000
    assert device.address == "10.0.0.9:7000"
    assert [b.name for b in device.backends] == ["gpu"]
    assert device.backend("gpu").efficiency == 0.9
    assert device.backend("gpu").peak_gflops == preset_device("jetson-orin-nano-8gb").backend("gpu").peak_gflops
    with pytest.raises(FleetError, match="unknown preset 'raspberry-pi-6'.*raspberry-pi-5-8gb"):
        preset_device("raspberry-pi-6")
    with pytest.raises(FleetError, match="memory_gib.*did you mean 'memory_gb'"):
        preset_device("raspberry-pi-5-8gb", memory_gib=4)


# --- the TOML format -----------------------------------------------------------------------------


def test_docstring_example_loads(tmp_path):
    fleet = load_fleet(write(tmp_path, docstring_example()))
    assert fleet.name == "my-lab"
    assert [d.name for d in fleet.devices] == ["pi-a-0", "pi-a-1", "box"]
    box = fleet.device("box")
    assert box.memory_bytes == 16_000_000_000 and box.address == "10.0.0.5:7000" and box.kind == "custom"
    assert box.backend("cpu") == Backend("cpu", "cpu", 200.0, 38.4)
    assert fleet.link("box", "pi-a-0").bandwidth_bytes_s == 300e6 / 8
    assert fleet.link("box", "pi-a-0").latency_s == pytest.approx(2e-3)
    assert fleet.link("pi-a-0", "pi-a-1") == Link("pi-a-0", "pi-a-1", 125e6, 0.3e-3)
    assert fleet_from_dict(fleet.to_dict(), source="x") == fleet


def test_count_expansion(tmp_path):
    path = write(tmp_path, 'name = "lab"\n[[device]]\nname = "pi"\npreset = "raspberry-pi-5-8gb"\ncount = 3\n')
    fleet = load_fleet(path)
    assert [d.name for d in fleet.devices] == ["pi-0", "pi-1", "pi-2"]
    assert len({dataclasses.replace(d, name="x") for d in fleet.devices}) == 1  # identical otherwise
    assert fleet.source == str(path)


def test_links_are_symmetric_with_default(tmp_path):
    text = ('name = "lab"\n[default_link]\npreset = "wifi-6"\nlatency_ms = 3\n'
            '[[device]]\nname = "a"\npreset = "raspberry-pi-5-8gb"\n'
            '[[device]]\nname = "b"\npreset = "raspberry-pi-5-8gb"\n'
            '[[device]]\nname = "c"\npreset = "raspberry-pi-5-8gb"\n'
            '[[link]]\na = "a"\nb = "b"\nbandwidth_mbps = 100\nlatency_ms = 1\n')
    fleet = load_fleet(write(tmp_path, text))
    assert fleet.link("a", "b") == Link("a", "b", 12.5e6, 1e-3)
    assert fleet.link("b", "a") == Link("b", "a", 12.5e6, 1e-3)
    assert fleet.link("a", "c") == Link("a", "c", 75e6, 3e-3)  # wifi-6 bandwidth, overridden latency
    assert fleet.link("c", "a").transfer_s(75e6) == pytest.approx(1.003)
    assert fleet.link("a", "c").transfer_s(0) == 0.0
    with pytest.raises(FleetError, match="'a' to itself"):
        fleet.link("a", "a")
    with pytest.raises(FleetError, match="no device 'z'.*'a', 'b', 'c'"):
        fleet.link("a", "z")


def test_default_link_is_gigabit_full_mesh():
    fleet = Fleet("t", (preset_device("raspberry-pi-5-8gb", "p"), preset_device("intel-n100-edge-box", "n")))
    assert fleet.default_link == Link("*", "*", 125e6, 0.3e-3)
    assert fleet.link("n", "p") == Link("n", "p", 125e6, 0.3e-3)
    assert fleet.slots() == [("p", "cpu"), ("n", "cpu"), ("n", "gpu")]


def test_lookups_name_what_exists():
    device = preset_device("raspberry-pi-5-8gb", "pi")
    with pytest.raises(FleetError, match="device 'pi' has no backend 'gpu'.*'cpu'"):
        device.backend("gpu")
    fleet = load_fleet("pi-cluster")
    with pytest.raises(FleetError, match="preset:pi-cluster.*no device 'pi5'.*'pi5-0'"):
        fleet.device("pi5")


def test_load_fleet_passes_fleets_and_reads_json(tmp_path):
    fleet = load_fleet("phones")
    assert load_fleet(fleet) is fleet
    path = write(tmp_path, json.dumps(fleet.to_dict()), "phones.json")
    assert load_fleet(path) == fleet
    assert load_fleet(str(path)).source == str(path)


def test_unknown_fleet_name_lists_presets(tmp_path):
    with pytest.raises(FleetError, match="home-lan.*did you mean 'home-lab'.*pi-cluster"):
        load_fleet("home-lan")
    missing = tmp_path / "nope.toml"
    with pytest.raises(FleetError, match=re.escape(str(missing))):
        load_fleet(missing)


def test_fleet_error_is_a_value_error():
    assert issubclass(FleetError, ValueError)


def test_direct_construction_is_validated():
    cpu = Backend("cpu", "cpu", 10, 1)
    with pytest.raises(FleetError, match="device name 'a' is used twice"):
        Fleet("t", (Device("a", 1, (cpu,)), Device("a", 1, (cpu,))), source="here.toml")
    with pytest.raises(FleetError, match="unknown device 'c'"):
        Fleet("t", (Device("a", 1, (cpu,)),), links=(Link("a", "c", 1, 0),))
    with pytest.raises(FleetError, match="efficiency"):
        Backend("cpu", "cpu", 10, 1, efficiency=1.5)
    assert Device("a", 8e9, [cpu]).memory_bytes == 8_000_000_000


# --- validation errors: each names the file and the offender ------------------------------------

PI = '[[device]]\nname = "pi"\npreset = "raspberry-pi-5-8gb"\n'

BAD_FILES = {
    "syntax": ('name = "lab"\nname = = 2\n', r"invalid TOML.*line 2"),
    "unknown preset": ('name = "lab"\n[[device]]\nname = "pi"\npreset = "raspberry-pi-6"\n',
                       r"device 'pi'.*unknown preset 'raspberry-pi-6'.*'raspberry-pi-5-8gb'"),
    "unknown device key": ('name = "lab"\n' + BOX.replace("memory_gb", "memory_gib"),
                           r"device 'box'.*unknown key 'memory_gib'.*did you mean 'memory_gb'"),
    "unknown backend key": ('name = "lab"\n' + BOX.replace("peak_gflops", "peak_glops"),
                            r"device 'box'.*backend 'cpu'.*unknown key 'peak_glops'.*'peak_gflops'"),
    "unknown top-level key": ('name = "lab"\n' + BOX.replace("[[device]]", "[[devices]]"),
                              r"unknown key 'devices'.*did you mean 'device'"),
    "missing memory": ('name = "lab"\n' + BOX.replace("memory_gb = 16", ""),
                       r"device 'box'.*missing memory_gb or memory_bytes.*fix"),
    "negative memory": ('name = "lab"\n' + BOX.replace("memory_gb = 16", "memory_gb = -1"),
                        r"device 'box'.*memory_gb must be a positive number, got -1"),
    "zero memory": ('name = "lab"\n' + BOX.replace("memory_gb = 16", "memory_gb = 0"),
                    r"device 'box'.*memory_gb must be a positive number, got 0"),
    "zero peak": ('name = "lab"\n' + BOX.replace("peak_gflops = 200", "peak_gflops = 0"),
                  r"device 'box'.*backend 'cpu'.*peak_gflops must be a positive number.*datasheet"),
    "missing peak": ('name = "lab"\n' + BOX.replace("peak_gflops = 200", ""),
                     r"device 'box'.*backend 'cpu'.*missing 'peak_gflops'"),
    "negative memory bandwidth": ('name = "lab"\n' + BOX.replace("38.4", "-38.4"),
                                  r"device 'box'.*backend 'cpu'.*mem_bandwidth_gbs must be a positive"),
    "zero link bandwidth": ('name = "lab"\n' + PI + BOX
                            + '[[link]]\na = "pi"\nb = "box"\nbandwidth_mbps = 0\nlatency_ms = 1\n',
                            r"link 'pi' <-> 'box'.*bandwidth_mbps must be a positive number"),
    "zero default link bandwidth": ('name = "lab"\n[default_link]\nbandwidth_mbps = 0\nlatency_ms = 1\n' + PI,
                                    r"default_link.*bandwidth_mbps must be a positive"),
    "no backends": ('name = "lab"\n[[device]]\nname = "box"\nmemory_gb = 16\n',
                    r"device 'box'.*has no backends.*\[\[device.backend\]\]"),
    "duplicate device": ('name = "lab"\n' + BOX + BOX, r"device name 'box' is used twice"),
    "duplicate after count": ('name = "lab"\n' + PI + "count = 2\n" + PI.replace('"pi"', '"pi-1"'),
                              r"device name 'pi-1' is used twice.*'pi' with count = 2 expands to"),
    "duplicate backend": ('name = "lab"\n' + BOX + BOX.split("memory_gb = 16\n")[1],
                          r"device 'box'.*backend name 'cpu' is used twice"),
    "unknown backend kind": ('name = "lab"\n' + BOX.replace('kind = "cpu"', 'kind = "tpu"'),
                             r"device 'box'.*backend 'cpu'.*kind 'tpu'.*'cpu', 'gpu', 'npu'"),
    "link to unknown device": ('name = "lab"\n' + PI + BOX
                               + '[[link]]\na = "pi"\nb = "bx"\npreset = "wifi-5"\n',
                               r"link 'pi' <-> 'bx'.*unknown device 'bx'.*did you mean 'box'"),
    "link to counted name": ('name = "lab"\n' + PI + "count = 2\n" + BOX
                             + '[[link]]\na = "pi"\nb = "box"\npreset = "wifi-5"\n',
                             r"link 'pi' <-> 'box'.*names 'pi'.*expands to 'pi-0', 'pi-1'"),
    "link to itself": ('name = "lab"\n' + BOX + '[[link]]\na = "box"\nb = "box"\npreset = "wifi-5"\n',
                       r"link 'box' <-> 'box'.*connects device 'box' to itself"),
    "duplicate link": ('name = "lab"\n' + PI + BOX
                       + '[[link]]\na = "pi"\nb = "box"\npreset = "wifi-5"\n'
                       + '[[link]]\na = "box"\nb = "pi"\npreset = "wifi-6"\n',
                       r"link 'box' <-> 'pi' is given twice"),
    "unknown link preset": ('name = "lab"\n' + PI + BOX + '[[link]]\na = "pi"\nb = "box"\npreset = "wifi-7"\n',
                            r"link 'pi' <-> 'box'.*unknown link preset 'wifi-7'.*'wifi-6'"),
    "empty fleet": ('name = "lab"\n', r"fleet 'lab' has no devices.*\[\[device\]\]"),
    "missing fleet name": (BOX, r"missing 'name'.*name = "),
    "address with count": ('name = "lab"\n' + PI + 'count = 2\naddress = "10.0.0.1:7000"\n',
                           r"device 'pi'.*address '10.0.0.1:7000'.*count = 2"),
    "bad address": ('name = "lab"\n' + BOX.replace("memory_gb = 16", 'memory_gb = 16\naddress = "box"'),
                    r"device 'box'.*address 'box' is not host:port"),
    "single brackets": ('name = "lab"\n[device]\nname = "box"\n',
                        r"'device' must be an array of tables.*\[\[device\]\]"),
    "zero codec speed": ('name = "lab"\n' + PI + "codec_gbs = 0\n",
                         r"device 'pi'.*codec_gbs must be a positive number, got 0.*edgeplan codecs"),
    "text codec speed": ('name = "lab"\n' + BOX.replace("memory_gb = 16", 'memory_gb = 16\ncodec_gbs = "fast"'),
                         r"device 'box'.*codec_gbs must be a positive number, got 'fast'"),
    "unknown only_backends": ('name = "lab"\n' + PI + 'only_backends = ["gpu"]\n',
                              r"device 'pi'.*only_backends names 'gpu'.*'cpu'"),
}


@pytest.mark.parametrize("case", sorted(BAD_FILES))
def test_bad_file_raises_fleet_error_naming_file_and_offender(tmp_path, case):
    text, pattern = BAD_FILES[case]
    path = write(tmp_path, text)
    with pytest.raises(FleetError, match=pattern) as caught:
        load_fleet(path)
    assert str(caught.value).startswith(str(path)), str(caught.value)
    assert "fix" in str(caught.value)


def test_tvm_target_per_backend(tmp_path):
    """ARM presets say which TVM target their CPU stages need; a fleet file can set or override it."""
    for kind in ("raspberry-pi-5-8gb", "jetson-orin-nano-8gb", "snapdragon-8-gen3-phone"):
        assert preset_device(kind).backend("cpu").tvm_target == "aarch64"
    assert preset_device("jetson-orin-nano-8gb").backend("gpu").tvm_target is None
    assert preset_device("intel-n100-edge-box").backend("cpu").tvm_target is None
    path = write(tmp_path, 'name = "lab"\n[[device]]\nname = "orin"\npreset = "jetson-orin-nano-8gb"\n'
                           '[[device.backend]]\nname = "gpu"\ntvm_target = "cuda"\n')
    fleet = load_fleet(path)
    assert fleet.device("orin").backend("gpu").tvm_target == "cuda"
    assert fleet_from_dict(fleet.to_dict(), source="x") == fleet
    with pytest.raises(FleetError, match="tvm_target must be a TVM target name or JSON string"):
        load_fleet(write(tmp_path, 'name = "lab"\n[[device]]\nname = "orin"\npreset = "jetson-orin-nano-8gb"\n'
                                   '[[device.backend]]\nname = "gpu"\ntvm_target = 3\n', "bad.toml"))


def test_codec_speed_per_device(tmp_path):
    """Every preset states one core's codec speed; a fleet file can give or override it."""
    for kind in list_presets():
        assert preset_device(kind).codec_gbs > 0, kind
    assert preset_device("raspberry-pi-5-8gb").codec_gbs < preset_device("host").codec_gbs
    fleet = load_fleet(write(tmp_path, 'name = "lab"\n' + PI + "codec_gbs = 0.55\n" + BOX))
    assert fleet.device("pi").codec_gbs == 0.55
    assert fleet.device("box").codec_gbs is None  # spelled out without it: host-measured times
    assert fleet_from_dict(json.loads(json.dumps(fleet.to_dict())), source="x") == fleet
    assert preset_device("raspberry-pi-5-8gb", codec_gbs=1).codec_gbs == 1.0
