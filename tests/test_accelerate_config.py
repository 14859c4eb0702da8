from pathlib import Path

from accelerate.commands.config.config_args import ClusterConfig
from accelerate.utils import DistributedType

CONFIG = Path(__file__).resolve().parents[1] / "accelerate_config.yaml"


def test_accelerate_config_is_single_node_multi_gpu_bf16():
    config = ClusterConfig.from_yaml_file(CONFIG)
    assert config.distributed_type == DistributedType.MULTI_GPU
    assert config.num_machines == 1
    assert config.mixed_precision == "bf16"
    assert config.gpu_ids == "all"
    assert config.num_processes >= 2
    assert not config.deepspeed_config
