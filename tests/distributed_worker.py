"""`captioner train ARGS...` for the tests, run alone or under torchrun, with two test-only hooks
set by environment variables (the training code itself has none):

  TEST_KILL_AT_STEP=N   rank 0 sends itself SIGKILL just before the step after global step N:
                        a kill -9 in the middle of training at a reproducible point (torchrun
                        then stops the other ranks, as it would after a real crash)
  TEST_DUMP_DIR=DIR     after training, every rank writes its weights (CNN and decoder) to
                        DIR/rankR.safetensors
"""
import os
import signal
import sys

from safetensors.torch import save_file

from captioner import cli, train

KILL_AT = int(os.environ.get("TEST_KILL_AT_STEP", "0"))
DUMP_DIR = os.environ.get("TEST_DUMP_DIR")
train_step, fit = train.Trainer.train_step, train.Trainer.fit


def killing_train_step(self, inputs, tokens):
    if KILL_AT and self.world.is_main and self.state["global_step"] == KILL_AT:
        os.kill(os.getpid(), signal.SIGKILL)
    return train_step(self, inputs, tokens)


def dumping_fit(self):
    best = fit(self)
    if DUMP_DIR:
        weights = {k: v.detach().cpu().contiguous() for k, v in self.captioner.state_dict().items()}
        save_file(weights, os.path.join(DUMP_DIR, f"rank{self.world.rank}.safetensors"))
    return best


train.Trainer.train_step = killing_train_step
train.Trainer.fit = dumping_fit
sys.exit(cli.main(sys.argv[1:]))
