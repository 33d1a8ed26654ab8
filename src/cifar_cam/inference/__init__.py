"""Using a trained model: the deployed contract, exported files written and read back, the Predictor (the one way
to load a model for predictions) and its inputs. Imports training, explain, data, models, config and the leaves."""
