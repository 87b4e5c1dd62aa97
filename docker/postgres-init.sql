-- The four databases of the platform (run once by the postgres image on an empty data volume).
CREATE DATABASE airflow;
CREATE DATABASE mlflow;
CREATE DATABASE optuna;
CREATE DATABASE platform;
