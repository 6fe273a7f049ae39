"""Chat prompts for self-distillation: the base model answers them and its own replies become
the training targets. Built from templates over topics and tasks so that the set is broad and
deterministic; none of them is in bench/data/chat_prompts.txt (the held-out evaluation set)."""

from __future__ import annotations

import random

TOPICS = [
    "photosynthesis", "black holes", "the water cycle", "compound interest", "machine learning",
    "the French Revolution", "vaccines", "climate change", "the stock market", "recursion", "DNA",
    "volcanoes", "the internet", "electricity", "the Moon landing", "gravity", "inflation", "democracy",
    "blockchain", "the human heart", "honeybees", "the Roman Empire", "plate tectonics", "solar panels",
    "neural networks", "the immune system", "rainbows", "earthquakes", "the Renaissance", "chess", "jazz",
    "the Pythagorean theorem", "prime numbers", "the speed of light", "baking bread", "meditation", "recycling",
    "ocean tides", "hurricanes", "dinosaurs", "antibiotics", "the printing press", "wind turbines",
    "cloud computing", "encryption", "coral reefs", "the Great Wall of China", "electric cars", "magnets",
    "the periodic table", "music theory", "supply and demand", "the Olympic Games", "migratory birds",
    "coffee", "public libraries", "the human brain", "glaciers", "rockets", "friendship",
    "sleep", "exercise", "healthy eating", "houseplants", "dogs", "owls", "the ocean", "deserts",
    "rainforests", "mountains", "the Sun", "Mars", "the Milky Way", "comets", "the weather", "snow",
    "thunderstorms", "bicycles", "trains", "airports", "cars", "bridges", "skyscrapers", "the Eiffel Tower",
    "ancient Egypt", "the Vikings", "the Industrial Revolution", "the Cold War", "Shakespeare", "poetry",
    "painting", "photography", "movies", "video games", "board games", "soccer", "basketball", "yoga",
    "gardening", "cooking pasta", "chocolate", "tea", "cheese", "spices", "vegetarian food", "fruit",
    "smartphones", "laptops", "social media", "email", "passwords", "robots", "artificial intelligence",
    "3D printing", "batteries", "nuclear energy", "water pollution", "forests", "bees and flowers", "sharks",
    "whales", "elephants", "penguins", "butterflies", "ants", "the moon's phases", "time zones", "calendars",
    "money", "taxes", "saving for retirement", "credit cards", "starting a business", "teamwork", "leadership",
    "public speaking", "learning a language", "reading books", "writing essays", "studying for exams",
    "mathematics", "fractions", "algebra", "geometry", "statistics", "probability", "the scientific method",
    "atoms", "chemical reactions", "evolution", "cells", "bacteria", "the skeleton", "muscles", "nutrition",
    "first aid", "the flu", "allergies", "stress", "happiness", "kindness", "volunteering", "holidays",
    "birthdays", "weddings", "camping", "hiking", "swimming", "fishing", "the beach", "cities", "villages",
    "farming", "bread", "pizza", "sushi", "ice cream", "clocks", "maps", "compasses", "lighthouses",
]

TOPIC_TEMPLATES = [
    "What is {t}?", "Explain {t} to a ten-year-old.", "Give me three interesting facts about {t}.",
    "Write a short poem about {t}.", "Why is {t} important?", "Summarize the history of {t} in a few sentences.",
    "What are the pros and cons of {t}?", "Write a short story that involves {t}.",
    "How would you explain {t} in one paragraph?", "List five questions a student might ask about {t}.",
    "What is a common misconception about {t}?", "Write a tweet about {t}.",
    "How does {t} work?", "Tell me about {t}.", "What are some tips related to {t}?", "Describe {t}.",
    "Write a haiku about {t}.", "What should a beginner know about {t}?", "Give me a fun fact about {t}.",
    "Why do people like {t}?",
]

TASKS = [
    "How do I boil an egg?", "How do I write a good resume?", "How can I save money on groceries?",
    "How do I start running as a beginner?", "How do I plant tomatoes?", "How can I be more productive at work?",
    "How do I clean a cast iron pan?", "How do I prepare for a job interview?",
    "How do I learn to play the guitar?", "How can I reduce stress?", "How do I make friends in a new city?",
    "How do I back up my computer?", "How do I write a cover letter?", "How can I drink more water during the day?",
    "How do I fold a paper airplane?", "How do I make a budget?", "How do I take care of a houseplant?",
    "How can I improve my handwriting?", "How do I make cold brew coffee?", "How do I organize my closet?",
    "Write a Python function that checks whether a number is prime.",
    "Write a Python function that returns the factorial of n.",
    "Write a Python function that counts the vowels in a string.",
    "Write a Python function that sorts a list of words by length.",
    "Write a JavaScript function that adds two numbers.", "Write a SQL query that selects all users older than 30.",
    "Write a Python function that computes Fibonacci numbers.",
    "Write a Python class for a bank account with deposit and withdraw methods.",
    "Write a bash command that counts the lines in a file.",
    "Write a Python function that removes duplicates from a list.",
    "Write an email to my manager asking for a day off.", "Write a birthday message for my sister.",
    "Write a short product description for a reusable water bottle.", "Write a limerick about a cat.",
    "Write a motivational quote.", "Write a short speech for a friend's wedding.",
    "Write a text message inviting friends to a picnic.", "Write a review of a pizza restaurant.",
    "What is 7 times 8?", "What is the square root of 144?", "What is 25 percent of 80?",
    "Convert 100 Fahrenheit to Celsius.", "What is the capital of Japan?", "Who wrote Romeo and Juliet?",
    "How many continents are there?", "What is the largest ocean on Earth?", "What is the boiling point of water?",
    "Who painted the Mona Lisa?", "What is the tallest mountain in the world?",
    "What language is spoken in Brazil?", "Hi! How are you today?", "Tell me something fun to do on a rainy day.",
    "What should I cook for dinner tonight?", "Recommend a movie for a family night.", "Give me a riddle.",
    "What is a good name for a coffee shop?", "Suggest a weekend workout plan.",
    "What are some tips for a long road trip?", "Tell me a fun fact about space.",
    "What are good habits for students?",
]


def training_prompts(n: int | None = None, seed: int = 0) -> list[str]:
    """All template prompts (topics x templates, then the tasks), shuffled; the first ``n``."""
    prompts = [tpl.format(t=t) for t in TOPICS for tpl in TOPIC_TEMPLATES] + TASKS
    random.Random(seed).shuffle(prompts)
    return prompts[:n] if n else prompts
