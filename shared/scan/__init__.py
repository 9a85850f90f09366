"""The simulated LiDAR scan: one dense depth map and its K in, the sparse depth a sensor beside the camera
would give out. Both packages use it: datagen writes each shard's scan with it, and the trainer can draw a
new scan in its loader from the same dense depth.

    spec.py         ScanSpec: which scan (pattern, mount, surface, occlusion, sensor), parsed once from the
                    command-line spellings; `simulate_sparse_depth(depth, K, rng, spec)` is the one call
    lidar.py        the mount, the casting (height-field walk or Open3D BVH) and the projection to pixels
    patterns.py     which rays: spinning presets, Livox rosettes, line scans, pattern files
    sensor.py       the sensor's effects: range noise, dropouts, mixed returns
    heightfield.py  the grid surface of a depth map and its exact ray walk (numba)
    mesh.py         triangle meshes: the grid mesh, Poisson (Open3D, imported only on that path)
    hidden.py       the background hidden behind occluding edges, for an offset sensor
    fit.py          a pattern fitted to a user's own real scans
    fidelity.py     how close a simulated scan comes to the exact world's

Needs numpy and numba; Open3D only for the Poisson surface and the BVH caster.
"""
