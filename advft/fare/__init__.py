"""FARE fine-tuning: the step (:mod:`advft.fare.step`) and the engine task (:mod:`advft.fare.task`)."""
from advft.fare.step import FareSpec, StepModels, adversarial_batch, attack_init, fare_step, frozen
from advft.fare.task import FareTask, build_optimizer, finetune

__all__ = ["FareSpec", "FareTask", "StepModels", "adversarial_batch", "attack_init", "build_optimizer", "fare_step",
           "finetune", "frozen"]
