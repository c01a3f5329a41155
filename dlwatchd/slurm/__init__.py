"""The Slurm executor: claimed train and inference jobs run as Slurm jobs (`dlwatchd exec-job`) on cluster nodes."""
