"""The model file MLflow logs as code (models-from-code) for ``log_pyfunc_model``.

MLflow copies this file into the logged model and runs it when the model is loaded, with the model's
``code`` folder (the ``msa`` and ``shards`` packages) on ``sys.path``; ``set_model`` hands it the
served ``MSAEmbedder``. Nothing is pickled. Nothing in the project imports this module.
"""

from mlflow.models import set_model

from msa.runtime.serving import MSAEmbedder

set_model(MSAEmbedder())
