"""Multirun: what a sweep's jobs share and how a sweep ends.

``sparsebench -m ...`` runs each job through Hydra's launcher (in this process, in joblib workers or
as SLURM jobs). Inside a job the app uses ``job`` (W&B group and tags, folder names), ``gpus`` (one
GPU per concurrent job; jobs sharing one benchmark alone), ``dense`` (one dense pre-training for the
whole sweep) and ``relaunch`` (a sweep or run continued only with the config it ran with); in the
launching process Hydra calls ``callback.SweepReport`` once every job has ended.
"""
