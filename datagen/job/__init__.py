"""The datagen job: a source's inputs -> shards, resumable, on Ray; the per-sample path is datagen.sample.

    pipeline.py     run(cfg): prepare, lock, skip finished shards, run the shard tasks, rebuild the tables
    settings.py     RunConfig (frozen; its settings of the bytes are the job's fingerprint) and the errors
    shard_files.py  shard names, sidecars, the manifest and failures tables
    ray_runner.py   the only module that imports Ray: cluster, teacher replicas, progress
    lock.py         one run per output folder (fcntl, or a lease object in object storage)
    runtime_env.py  the code shipped to a cluster's nodes
"""
