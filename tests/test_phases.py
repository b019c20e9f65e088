"""The two-phase routine's plans and rules (pure): which phases, which blocks, when a phase stops."""

from __future__ import annotations

from harness.phases import two_phase_plan


def test_no_unfrozen_blocks_means_no_phase2():
    assert [p.name for p in two_phase_plan(3, 1e-3, None, 5, 1e-4, None, n_unfreeze=0)] == ["head"]


def test_from_scratch_early_stopping_waits_for_the_step_floor_and_a_still_falling_loss():
    """The demo's baseline once stopped at a quarter of its step floor: its best val_accuracy came at
    the first validation while the validation loss kept falling."""
    from harness.phases import scratch_keeps_training

    flat_accuracy = [0.22, 0.20, 0.20, 0.20, 0.20]
    falling_loss = [1.91, 1.85, 1.78, 1.70, 1.61]
    assert scratch_keeps_training(falling_loss, flat_accuracy, "maximize", patience=3)  # the loss still falls
    stalled_loss = [1.91, 1.85, 1.86, 1.87, 1.88]
    assert not scratch_keeps_training(stalled_loss, flat_accuracy, "maximize", patience=3)  # neither moves: stop
    assert scratch_keeps_training(stalled_loss, flat_accuracy, "maximize", patience=3, min_epochs=6)  # below the floor
    assert not scratch_keeps_training(stalled_loss + [1.9], flat_accuracy + [0.2], "maximize", patience=3, min_epochs=6)
    rising_accuracy = [0.2, 0.3, 0.4, 0.5, 0.6]  # overfitting loss, better accuracy: go on
    assert scratch_keeps_training([1.5, 1.6, 1.7, 1.8, 1.9], rising_accuracy, "maximize", patience=3)
    assert scratch_keeps_training([2.0, float("nan")], [0.2, 0.2], "maximize", patience=None)  # no patience: never
