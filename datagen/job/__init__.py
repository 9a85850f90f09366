"""The datagen job: a source's inputs -> shards, resumable, on Ray or in this process; the per-sample path is
datagen.sample.

    pipeline.py      run(cfg): prepare, lock, skip finished shards, run the shard tasks, rebuild the tables
    settings.py      RunConfig (frozen; its settings of the bytes are the job's fingerprint) and the errors
    shard_files.py   shard names, sidecars, the manifest and failures tables
    executor.py      which runner runs the shard tasks (--executor), their common progress display
    ray_runner.py    the only module that imports Ray: cluster, teacher replicas, shard tasks on Ray
    local_runner.py  the shard tasks and the teacher in this process, without Ray (--executor local)
    lock.py          one run per output folder (fcntl, or a lease object in object storage)
    runtime_env.py   the code shipped to a cluster's nodes
"""
