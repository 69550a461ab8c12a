-- compose.yaml: one PostgreSQL, two databases (Prefect's is created by POSTGRES_DB).
CREATE DATABASE mlflow OWNER lora;
