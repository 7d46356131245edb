"""The host side: the code that starts training containers, and never runs in them.

Nothing here imports TensorFlow or Keras, and MLflow only inside the functions that
need it, so `project_driver.py --help` answers at once. Arrows point one way, top to
bottom; the engine never imports this package.

    facts      what this host offers: GPUs, the Docker bridge gateway, the tracking server
    plan       a run's docker args, decided from those facts, one line each
    image      the image tag (from MLproject) and the build for exactly the code that runs
    checkout   a version from git, checked out fresh
    artifacts  an experiment's local artifact folder; creating a run first
    launch     the one launcher: 1..N `mlflow run`, P at a time, retries that resume or start over
    run        one run (make run, project_driver.bash): prepare it, then launch it
    sweep      a grid of parameter values, several runs at once (make sweep)
    tune       engine.tune's workers as containers, one GPU each (make tune-docker)
    workers    make run WORKERS=N: N containers of one run, each with its TF_CONFIG
    kube       make kube-run WORKERS=N: the Indexed Job template and its headless Service
    reproduce  make reproduce of a run made in the image: the image rebuilt from its commit
"""
