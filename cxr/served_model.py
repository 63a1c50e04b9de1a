"""The file MLflow logs as the model's code ("models from code"), so nothing is pickled: loading
it builds an `XrayClassifier`, which reads its weights and threshold from the logged artifacts."""

from mlflow.models import set_model

from cxr.serving import XrayClassifier

set_model(XrayClassifier())
