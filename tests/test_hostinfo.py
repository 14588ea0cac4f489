"""catjax.hostinfo: accelerators recognised from their device nodes."""

import fnmatch

import pytest

from catjax import hostinfo

HOSTS = {
    "cpu": ["/dev/null", "/dev/vfio/vfio", "/dev/nvidiactl"],
    "tpu_v4": ["/dev/accel0", "/dev/accel1"],
    "tpu_v5e": ["/dev/vfio/vfio", "/dev/vfio/0", "/dev/vfio/1"],
    "gpu": ["/dev/nvidiactl", "/dev/nvidia0", "/dev/nvidia-uvm"],
}


@pytest.mark.parametrize("host,tpu,gpu", [("cpu", False, False), ("tpu_v4", True, False),
                                          ("tpu_v5e", True, False), ("gpu", False, True)])
def test_accelerators_from_device_nodes(monkeypatch, host, tpu, gpu):
    monkeypatch.setattr(hostinfo.glob, "glob",
                        lambda pattern: fnmatch.filter(HOSTS[host], pattern))
    assert (hostinfo.tpu_present(), hostinfo.gpu_present()) == (tpu, gpu)
