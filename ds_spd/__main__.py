from ds_spd.cli import entry

entry()
