"""kalmanopt inside the trainers people use: each module imports its framework only when it is imported.

- :mod:`kalmanopt.integrations.transformers`: ``KalmanTrainer`` (per-sample losses) and ``KalmanCallback``
  (a plain ``Trainer``, the model's own loss);
- :mod:`kalmanopt.integrations.lightning`: ``KalmanCallback`` (automatic optimization);
- accelerate and timm need no module: ``kalmanopt.observe(optimizer, losses)`` before ``optimizer.step()``
  (or timm's ``NativeScaler``), see ``docs/integrations.md``.

Install the frameworks at the tested versions with ``pip install "kalmanopt[integrations]"``.
"""
