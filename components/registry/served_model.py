"""The zhclip pyfunc model as MLflow "models from code": `zhclip register` logs this file, and MLflow
runs it wherever the model is loaded, with the shipped `model/` package on `sys.path`.

It imports only mlflow and `model`, since a pull happens where the zhclip repository is absent.
Wrapping `model.pyfunc.ZhclipEmbedder` in a PythonModel (rather than a loader module) lets bad input
surface as MLflow's own invalid-parameter error: the scoring server then answers HTTP 400 with the
row in its message, instead of a generic "unexpected error" hiding it in a stack trace.
"""

import pandas as pd
from mlflow.exceptions import MlflowException
from mlflow.models import set_model
from mlflow.pyfunc.model import PythonModel

from zhclip.model.pyfunc import load_embedder


class ZhclipModel(PythonModel):
    def load_context(self, context) -> None:
        self.embedder = load_embedder(context.artifacts["model_dir"], context.model_config)

    # The DataFrame hint only says what MLflow passes: it validates against the logged signature, and
    # without a hint it warns at every load that one is missing.
    # (PythonModel.predict has no return annotation and a docstring for a body: the checker infers None)
    def predict(self, context, model_input: pd.DataFrame, params: dict | None = None):  # pyright: ignore[reportIncompatibleMethodOverride]
        try:
            return self.embedder.predict(model_input, params)
        except ValueError as err:
            raise MlflowException.invalid_parameter_value(str(err)) from err


set_model(ZhclipModel())
