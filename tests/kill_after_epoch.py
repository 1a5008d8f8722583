"""``python tests/kill_after_epoch.py K ds-spd-args...``: run the CLI, SIGKILL this process right after the
training state of epoch K is saved (a crash between two epochs, no Python cleanup)."""
import os
import signal
import sys

from ds_spd import cli
from ds_spd.stages import distill


def main():
    kill_after = int(sys.argv[1])
    save = distill._Trainer.save

    def save_then_die(self, directory, epoch, client):
        save(self, directory, epoch, client)
        if epoch == kill_after:
            os.kill(os.getpid(), signal.SIGKILL)
    distill._Trainer.save = save_then_die
    sys.exit(cli.main(sys.argv[2:]))


if __name__ == "__main__":
    main()
