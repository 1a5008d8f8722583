"""``python tests/support/kill_after_epoch.py K ds-spd-args...``: run the CLI, SIGKILL this process right after the
training state of epoch K is saved (a crash between two epochs, no Python cleanup). ``K`` = ``blockN``: right
after the layer-wise trainer stored finished block N (a crash between two blocks); ``blockN:K``: right after block
N's epoch K is saved (a crash inside a block later in the chain)."""
import os
import signal
import sys

from ds_spd import cli
from ds_spd.stages.distill import kit, layerwise


def main():
    when = sys.argv[1]
    if when.startswith("block") and ":" in when:
        block, epoch = (int(v) for v in when[5:].split(":"))
        save = kit.Trainer.save

        def save_then_die(self, directory, saved_epoch, client):
            save(self, directory, saved_epoch, client)
            if os.path.basename(directory) == f"block{block:03d}" and saved_epoch == epoch:
                os.kill(os.getpid(), signal.SIGKILL)
        kit.Trainer.save = save_then_die
    elif when.startswith("block"):
        save_done = layerwise._save_done

        def save_done_then_die(work_dir, i, state, info):
            save_done(work_dir, i, state, info)
            if i == int(when[5:]):
                os.kill(os.getpid(), signal.SIGKILL)
        layerwise._save_done = save_done_then_die
    else:
        save = kit.Trainer.save

        def save_then_die(self, directory, epoch, client):
            save(self, directory, epoch, client)
            if epoch == int(when):
                os.kill(os.getpid(), signal.SIGKILL)
        kit.Trainer.save = save_then_die
    sys.exit(cli.main(sys.argv[2:]))


if __name__ == "__main__":
    main()
