"""JobSpec -> TrainConfig: unset fields take the one set of defaults (tunedock.jobs), enums go by name."""

from __future__ import annotations

import pytest

from services.common.protoconv import from_proto
from services.trainer.config import config_from_spec
from services.trainer.domain import JobSpec
from tunedock.errors import InvalidArgument
from tunedock.jobs import DEFAULTS
from tunedock.v1 import common_pb2
from tunedock.v1 import trainer_pb2 as pb


def _spec(method: common_pb2.MethodConfig, **hyper) -> JobSpec:
    """The domain spec a gRPC client's proto becomes (the servicer's conversion)."""
    return from_proto(JobSpec, _proto(method, **hyper))


def _proto(method: common_pb2.MethodConfig, **hyper) -> pb.JobSpec:
    return pb.JobSpec(
        base_model="/m",
        output_name="x",
        train_dataset_ids=["ds-1"],
        method=method,
        hyperparameters=pb.Hyperparameters(**hyper),
    )


def test_unset_fields_take_the_shared_defaults():
    lora = config_from_spec(_spec(common_pb2.MethodConfig(lora=common_pb2.LoraConfig())))
    assert (lora.epochs, lora.batch_size, lora.max_seq_length, lora.lr_schedule) == (
        DEFAULTS.epochs,
        DEFAULTS.batch_size,
        DEFAULTS.max_seq_length,
        DEFAULTS.lr_schedule,
    )
    assert (lora.lora_r, lora.lora_alpha, lora.target_modules) == (8, 16.0, ["all-linear"])
    assert lora.learning_rate == DEFAULTS.adapter_learning_rate
    full = config_from_spec(_spec(common_pb2.MethodConfig(full=common_pb2.FullConfig())))
    assert full.learning_rate == DEFAULTS.full_learning_rate and full.optimizer == ""
    qlora = config_from_spec(_spec(common_pb2.MethodConfig(qlora=common_pb2.QLoraConfig())))
    assert (qlora.quant_type, qlora.compute_dtype, qlora.double_quant, qlora.paged_optimizer) == (
        "nf4",
        "bfloat16",
        True,
        True,
    )
    steps_only = config_from_spec(_spec(common_pb2.MethodConfig(lora=common_pb2.LoraConfig()), max_steps=7))
    assert (steps_only.max_steps, steps_only.epochs) == (7, 0.0)


def test_enums_are_read_by_name():
    spec = _spec(
        common_pb2.MethodConfig(
            qlora=common_pb2.QLoraConfig(
                lora=common_pb2.LoraConfig(r=4, optimizer=common_pb2.OPTIMIZER_PAGED_ADAMW_8BIT),
                quant_type=common_pb2.QUANT_TYPE_FP4,
                compute_dtype=common_pb2.DTYPE_FLOAT16,
                double_quant=False,
            )
        ),
        lr_schedule=common_pb2.LR_SCHEDULE_LINEAR,
    )
    cfg = config_from_spec(spec)
    assert (cfg.optimizer, cfg.quant_type, cfg.compute_dtype, cfg.lr_schedule) == (
        "paged_adamw_8bit",
        "fp4",
        "float16",
        "linear",
    )
    assert (cfg.lora_r, cfg.lora_alpha, cfg.double_quant) == (4, 8.0, False)


def test_an_unknown_enum_number_is_refused_naming_the_field():
    with pytest.raises(InvalidArgument, match=r"spec.method.lora.optimizer: unknown value 99"):
        from_proto(JobSpec, _proto(common_pb2.MethodConfig(lora=common_pb2.LoraConfig(optimizer=99))), "spec.")


def test_specs_and_events_round_trip_through_the_wire_types_unchanged():
    from services.common.protoconv import to_proto
    from services.trainer.domain import JobEvent

    specs = [
        _proto(
            common_pb2.MethodConfig(
                qlora=common_pb2.QLoraConfig(
                    lora=common_pb2.LoraConfig(r=0, target_modules=["q_proj"]), double_quant=False
                )
            ),
            seed=7,
            lr_schedule=common_pb2.LR_SCHEDULE_CONSTANT,
        ),
        pb.JobSpec(output_name="x", extract=pb.ExtractSpec()),  # an empty extract is still an extraction
        pb.JobSpec(output_name="m", merge_adapter="a:1", labels=[common_pb2.Label(key="k", value="v")]),
    ]
    for proto in specs:
        domain = from_proto(JobSpec, proto)
        assert to_proto(domain, pb.JobSpec()) == proto
        assert JobSpec.model_validate_json(domain.model_dump_json()) == domain  # as the store keeps it
    assert from_proto(JobSpec, specs[0]).method.qlora.lora.r == 0  # set to 0 is not unset
    assert from_proto(JobSpec, specs[1]).kind == "extract" and from_proto(JobSpec, specs[2]).kind == "merge"
    event = pb.JobEvent(
        sequence=4, published=pb.PublishedEvent(ref="a:1", metrics=[common_pb2.Metric(name="l", value=0.5)])
    )
    event.time.GetCurrentTime()
    assert to_proto(from_proto(JobEvent, event), pb.JobEvent()) == event


@pytest.mark.parametrize(
    ("split", "ok"), [(0.0, True), (0.25, True), (0.7, False), (1.0, True), (500.0, True), (2.5, False)]
)
def test_validation_split_is_a_fraction_or_a_whole_number_of_records(split, ok):
    proto = _proto(common_pb2.MethodConfig(lora=common_pb2.LoraConfig()))
    proto.validation_split = split
    if ok:
        assert config_from_spec(from_proto(JobSpec, proto)).validation_split == split
    else:
        with pytest.raises(InvalidArgument, match="validation_split must be a fraction in"):
            config_from_spec(from_proto(JobSpec, proto))
