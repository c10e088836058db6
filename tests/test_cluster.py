"""Cluster definitions pass Ray's own schema validation (offline; nothing is launched)."""

from pathlib import Path

import pytest
import yaml

CLUSTER_DIR = Path(__file__).resolve().parents[1] / "cluster"


@pytest.mark.parametrize("path", sorted(CLUSTER_DIR.glob("*.yaml")), ids=lambda p: p.name)
def test_cluster_yaml_validates(path):
    from ray.autoscaler._private.commands import prepare_config
    from ray.autoscaler._private.util import validate_config

    config = yaml.safe_load(path.read_text())
    validate_config(prepare_config(config))
    assert config["available_node_types"]["gpu_worker"]["max_workers"] >= 1


def test_cluster_yaml_misspelled_key_rejected():
    from ray.autoscaler._private.commands import prepare_config
    from ray.autoscaler._private.util import validate_config

    config = yaml.safe_load((CLUSTER_DIR / "aws-gpu.yaml").read_text())
    config["max_wrokers"] = config.pop("max_workers")
    with pytest.raises(Exception, match="max_wrokers"):
        validate_config(prepare_config(config))
