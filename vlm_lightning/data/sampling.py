"""Train batches that resume exactly: where an interrupted epoch stopped is re-derived from the trainer's
restored progress, and the sampler starts the next epoch there (``VisionChatDataModule.train_dataloader``).

Example:
    >>> sampler = ResumableSampler(dataset, num_replicas=world, rank=rank, seed=0)
    >>> done, data_epoch = resume_position(trainer, n_batches)   # (0, 0) unless fit restarts mid-epoch
"""
from __future__ import annotations

from torch.utils.data import DataLoader, DistributedSampler

__all__ = ["ResumableSampler", "ResumableLoader", "resume_position"]


class ResumableSampler(DistributedSampler):
    """``DistributedSampler`` (a permutation seeded by ``seed + epoch``, this rank's slice; Lightning calls
    ``set_epoch``) whose next epoch can begin ``start`` samples in: a run resumed from a mid-epoch checkpoint
    then sees exactly the batches the uninterrupted run would have. ``len`` stays the whole epoch, so the
    trainer's batch count (restored from the checkpoint) and the epoch's end agree.

    ``epoch_offset`` maps the trainer's epoch number to the data's: a checkpoint written when ``max_steps``
    stops a run inside an epoch records that epoch as finished, so the resumed trainer counts one epoch ahead
    of the permutation it is still in.
    """

    def __init__(self, dataset, num_replicas: int = 1, rank: int = 0, seed: int = 0, shuffle: bool = True):
        super().__init__(dataset, num_replicas=num_replicas, rank=rank, shuffle=shuffle, seed=seed, drop_last=False)
        self.start = 0
        self.epoch_offset = 0

    def set_epoch(self, epoch: int) -> None:
        super().set_epoch(epoch + self.epoch_offset)

    def __iter__(self):
        indices = list(super().__iter__())
        start, self.start = self.start, 0  # only the first epoch after a restart is cut
        return iter(indices[start:])


class ResumableLoader(DataLoader):
    """A DataLoader that Lightning treats as resumable (``state_dict``/``load_state_dict``): its position is
    not stored here but re-derived from the trainer's restored batch progress (``ResumableSampler.start``)."""

    def state_dict(self) -> dict:
        return {}

    def load_state_dict(self, state_dict: dict) -> None:
        pass


def resume_position(trainer, n_batches: int) -> tuple[int, int]:
    """(train batches already trained on, the data epoch they belong to) when ``fit`` restarts from a
    checkpoint written inside an epoch of ``n_batches`` batches; (0, 0) otherwise."""
    if trainer is None or not getattr(trainer.fit_loop, "restarting", False):
        return 0, 0
    # processed, not completed: a checkpoint written in on_train_batch_end (ModelCheckpoint every N steps) holds
    # the batch as processed but not yet completed; Lightning completes it when the loop resets, after the
    # loaders are built (for a checkpoint written after the batch, the two are equal)
    done = trainer.fit_loop.epoch_loop.batch_progress.current.processed
    if not 0 < done < n_batches:
        return 0, 0
    return done, max(trainer.fit_loop.epoch_progress.current.started - 1, 0)
